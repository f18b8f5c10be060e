"""Adversarial attacks for the detection benchmark.

Every attack is untargeted, maximizes the cross-entropy loss, and works on images in ``[0, 1]``
(models normalize internally), so budgets are in pixel units of ``[0, 1]`` images. Build one with
keyword-only hyperparameters and call it on a batch: ``x_adv = PGD(model, eps=8/255)(x, y)``.
:func:`success_mask` tells which adversarial images the model misclassifies, and :class:`Mix`
splits a batch evenly between several attacks.

``ATTACKS`` maps the benchmark's attack names to their classes.
"""

from covguard.attacks.base import Attack, success_mask
from covguard.attacks.bim import BIM
from covguard.attacks.fgsm import FGSM
from covguard.attacks.igm import IGM
from covguard.attacks.mix import Mix
from covguard.attacks.pgd import PGD
from covguard.attacks.pgd_l2 import PGDL2

__all__ = ["ATTACKS", "BIM", "FGSM", "IGM", "PGD", "PGDL2", "Attack", "Mix", "success_mask"]

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "pgd_l2": PGDL2,
    "igm": IGM,
}
