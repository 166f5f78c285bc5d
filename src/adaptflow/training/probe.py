"""The linear probe: a logistic-regression head on frozen features, trained to convergence.

Full-batch L-BFGS with an L2 penalty (the standard linear-probe recipe, as in scikit-learn's
``LogisticRegression``), one L-BFGS step of up to ``lbfgs_iterations`` inner iterations per
recorded "epoch", so the learning curve and early stopping on validation still apply. Minibatch
SGD here under-trains small datasets: with fewer images than a batch, an epoch is one step.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from adaptflow.config import BaselineConfig
from adaptflow.contracts import EpochRecord
from adaptflow.training.loop import LoopResult

log = logging.getLogger(__name__)


def _loss_and_accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = head(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    cfg: BaselineConfig,
    seed: int = 0,
) -> tuple[nn.Linear, LoopResult]:
    torch.manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=cfg.lbfgs_iterations,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x_train), y_train) + cfg.l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    history: list[EpochRecord] = []
    best_state, best, best_epoch, stale, seconds = (
        copy.deepcopy(head.state_dict()),
        (-1.0, float("inf")),
        0,
        0,
        0.0,
    )
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        optimizer.step(closure)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        train_loss, train_acc = _loss_and_accuracy(head, x_train, y_train)
        val_loss, val_acc = _loss_and_accuracy(head, x_val, y_val)
        history.append(
            EpochRecord(
                epoch=epoch,
                train_loss=train_loss,
                train_accuracy=train_acc,
                val_loss=val_loss,
                val_accuracy=val_acc,
                seconds=elapsed,
            )
        )
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch, stale, best_state = (
                (val_acc, val_loss),
                epoch,
                0,
                copy.deepcopy(head.state_dict()),
            )
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    log.info("linear probe: best val acc %.4f at step %d of %d", best[0], best_epoch, len(history))
    return head, LoopResult(history, best_epoch, best[0], best[1], len(x_train) * len(history), seconds)
