"""A batch attacked by several attacks at once, each image by exactly one of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from covguard.attacks.base import Attack, check_batch

__all__ = ["Mix"]


class Mix:
    """Split every batch evenly between several attacks and put the results back together.

    Each call draws a random permutation of the ``N`` images and deals them out round-robin:
    the image at position ``j`` of the permutation goes to ``attacks[j % A]``, ``A =
    len(attacks)``. Every attack therefore gets ``N // A`` or ``N // A + 1`` images, and which
    images it gets is random. Each attack runs once on its own images; the adversarial images
    are returned in the original order and the assignment is kept in ``last_assignment_``.

    Every image stays within the budget of the attack it was assigned to, so with attacks of
    different norms or radii the batch has no single budget. All attacks treat images
    independently of their batch (eval mode, summed loss), so an image's result does not depend
    on which other images share its attack, except through the random-number stream of the
    attacks' random starts.

    Parameters
    ----------
    attacks : sequence of Attack
        The attacks to share the batch, at least one. The same attack may appear twice to get
        twice the share.
    generator : torch.Generator or None, default None
        Source of the permutations, for reproducible assignments; ``None`` uses torch's global
        generator. The permutation is drawn on the generator's device; the generator advances
        with every call.

    Attributes
    ----------
    last_assignment_ : LongTensor of shape (N,)
        After a call, ``last_assignment_[i]`` is the index in ``attacks`` of the attack that
        produced image ``i`` of the last batch; on the device of that batch.

    Raises
    ------
    ValueError
        If ``attacks`` is empty.
    TypeError
        If an element of ``attacks`` is not an :class:`Attack`, or ``generator`` is neither
        ``None`` nor a ``torch.Generator``.

    Shape
    -----
    - x: ``(N, C, H, W)`` floating-point images; it must have a range ``[0, 1]``.
    - y: ``(N,)`` ``torch.long`` labels.
    - Output: ``(N, C, H, W)``, values in ``[0, 1]``.

    Examples
    --------
    >>> from torch import nn
    >>> from covguard.attacks import FGSM, PGD
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    >>> mix = Mix([FGSM(model), PGD(model)], generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.rand(5, 3, 4, 4), torch.randint(0, 10, (5,))
    >>> mix(x, y).shape
    torch.Size([5, 3, 4, 4])
    >>> torch.bincount(mix.last_assignment_).tolist()
    [3, 2]
    """

    def __init__(
        self, attacks: Sequence[Attack], *, generator: torch.Generator | None = None
    ) -> None:
        attacks = tuple(attacks)
        if not attacks:
            raise ValueError("attacks must hold at least one Attack; got an empty sequence")
        for index, attack in enumerate(attacks):
            if not isinstance(attack, Attack):
                raise TypeError(f"attacks[{index}] must be an Attack; got {type(attack).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None; got {type(generator).__name__}"
            )
        self.attacks = attacks
        self.generator = generator

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Attack each image of ``x`` with the attack it is dealt; ``x`` is not modified.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)
            Floating-point images with values in ``[0, 1]``.
        y : Tensor of shape (N,)
            True labels, dtype ``torch.long``.

        Returns
        -------
        Tensor of shape (N, C, H, W)
            Adversarial images, image ``i`` made by ``attacks[last_assignment_[i]]``.

        Raises
        ------
        ValueError
            If ``x`` is not a floating 4-D tensor with values in ``[0, 1]`` or ``y`` is not a
            ``torch.long`` tensor of shape ``(N,)``.
        """
        y = check_batch(x, y)
        n = x.shape[0]
        device = torch.device("cpu") if self.generator is None else self.generator.device
        order = torch.randperm(n, generator=self.generator, device=device)  # (N,)
        assignment = torch.empty(n, dtype=torch.long, device=device)
        assignment[order] = torch.arange(n, device=device) % len(self.attacks)
        assignment = assignment.to(x.device)
        x_adv = torch.empty_like(x)
        for index, attack in enumerate(self.attacks):
            chosen = (assignment == index).nonzero().squeeze(1)  # (N_a,) image indices
            if chosen.numel() > 0:
                x_adv[chosen] = attack(x[chosen], y[chosen])
        self.last_assignment_ = assignment
        return x_adv
