"""The experiment configs shipped with the package, addressable by name: ``--config digits_cnn`` on the command line,
``load_config("digits_cnn")`` in Python (a path to any config file works as well). In a checkout, ``configs/`` is a
link to this folder, so ``configs/digits_cnn.py`` names the same file."""
