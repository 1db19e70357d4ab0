"""``python -m lepton_jax``: the ``lepton-jax`` command, for environments without the script on PATH (Colab)."""

import sys

from lepton_jax.cli import main

sys.exit(main())
