"""Adversarial robustness: attacks (FGSM, PGD; L∞, L2), adversarial-training objectives (FGSM, FGSM-RS, free,
PGD-AT, TRADES), robust evaluation with gradient-masking warnings, and a catastrophic-overfitting monitor."""

from lepton_jax.robust.attacks import fgsm, pgd, project, random_start
from lepton_jax.robust.evaluate import AttackSpec, accuracy_curve, evaluate_robustness, standard_attacks
from lepton_jax.robust.monitor import OverfittingMonitor, make_overfitting_monitor
from lepton_jax.robust.objectives import default_robust_config, make_adversarial_train_step

__all__ = ["AttackSpec", "OverfittingMonitor", "accuracy_curve", "default_robust_config", "evaluate_robustness",
           "fgsm", "make_adversarial_train_step", "make_overfitting_monitor", "pgd", "project", "random_start",
           "standard_attacks"]
