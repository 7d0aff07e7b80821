"""The optimizer of a training run (`--optimizer`): AdamW, the diffusers examples' choice, or CAME, PixArt-Σ's.

PixArt-Σ trains every stage with `CAMEWrapper` (diffusion/utils/optimizer.py: came-pytorch's `CAME`, unchanged) at
lr 2e-5, weight decay 0, betas (0.9, 0.999, 0.9999) and eps (1e-30, 1e-16) (configs/pixart_sigma_config/*.py); CAME
keeps factored second moments (a row and a column vector per matrix) instead of AdamW's full ones. It comes from the
`came-pytorch` package, part of the `train` extra.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

OPTIMIZERS = ("adamw", "came")
CAME_BETAS = (0.9, 0.999, 0.9999)  # update, squared-gradient and instability averages
CAME_EPSILONS = (1e-30, 1e-16)  # squared-gradient and instability regularisers
CAME_MISSING = (
    "--optimizer came needs the came-pytorch package: pip install came-pytorch (or diffusers-microdit[train]), "
    "or use --optimizer adamw."
)


def add_optimizer_args(group) -> None:
    """`--optimizer` and CAME's own hyper-parameters (AdamW's are the diffusers examples' `--adam_*` flags;
    `--adam_weight_decay` is the weight decay of both)."""
    group.add_argument(
        "--optimizer", default="adamw", choices=OPTIMIZERS,
        help="adamw (fused AdamW with --adam_beta1/2, --adam_epsilon) or came (CAME, PixArt-Sigma's optimizer, with "
        "--came_betas and --came_epsilons; needs the came-pytorch package). Both use --adam_weight_decay.",
    )
    group.add_argument(
        "--came_betas", type=float, nargs=3, default=list(CAME_BETAS), metavar=("B1", "B2", "B3"),
        help="CAME's averaging coefficients of the update, the squared gradient and the instability (PixArt-Sigma's "
        "0.9 0.999 0.9999).",
    )
    group.add_argument(
        "--came_epsilons", type=float, nargs=2, default=list(CAME_EPSILONS), metavar=("EPS1", "EPS2"),
        help="CAME's regularisers of the squared gradient and of the instability (PixArt-Sigma's 1e-30 1e-16).",
    )


def optimizer_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the optimizer flags: CAME without its package, betas outside [0, 1), epsilons <= 0."""
    if args.optimizer != "came":
        return []
    problems = [] if importlib.util.find_spec("came_pytorch") else [CAME_MISSING]
    if not all(0 <= beta < 1 for beta in args.came_betas):
        problems.append(f"--came_betas must each be in [0, 1), got {args.came_betas}.")
    if not all(eps > 0 for eps in args.came_epsilons):
        problems.append(f"--came_epsilons must both be > 0, got {args.came_epsilons}.")
    return problems


def build_optimizer(
    args: argparse.Namespace, parameters: list[torch.nn.Parameter], learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    """The `--optimizer` over `parameters` at `learning_rate`."""
    if args.optimizer == "came":
        try:
            from came_pytorch import CAME
        except ImportError:
            raise SystemExit(CAME_MISSING) from None
        return CAME(
            parameters, lr=learning_rate, betas=tuple(args.came_betas), eps=tuple(args.came_epsilons),
            weight_decay=args.adam_weight_decay,
        )
    # Fused AdamW: on CPU the per-tensor loop is several times slower than the step it updates.
    return torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in parameters),
    )
