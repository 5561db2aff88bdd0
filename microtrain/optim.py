"""SGD on compact gradients: only the trained rows of each layer are touched."""
from __future__ import annotations

import numpy as np


class SGD:
    """Plain SGD with optional momentum and weight decay (PyTorch's formulation).

    The trained rows live in the executor's arena (``master``); after each update they are
    written back into the layer's weights, which the forward pass reads. Unselected rows are
    never written.
    """

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr must be > 0 and momentum, weight_decay >= 0 "
                             f"(got {lr}, {momentum}, {weight_decay})")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)

    def step(self, run) -> None:
        for node, upd in run.trained():
            dw, db = run.grad(node.name)
            mw, mb = run.master(node.name)
            vw, vb = run.momentum(node.name)
            for grad, master, velocity, rows, param in ((dw, mw, vw, upd.weight, node.weight),
                                                        (db, mb, vb, upd.bias, node.bias)):
                if grad is None:
                    continue
                self._update(master, grad, velocity)
                if param is node.weight and upd.inputs is not None:
                    for j, row in enumerate(rows):  # row by row: a 2-D fancy index would allocate
                        param[row, upd.inputs] = master[j]
                elif len(rows) == len(param):  # every row (sorted, distinct): a plain copy
                    np.copyto(param, master)
                else:
                    param[rows] = master

    def _update(self, master: np.ndarray, grad: np.ndarray, velocity: np.ndarray | None) -> None:
        # In place on the gradient buffer, which is dead after this step: no allocation.
        if self.weight_decay:
            grad += master * np.float32(self.weight_decay)
        if self.momentum:
            if velocity is None:
                raise ValueError("SGD with momentum needs an executor planned with momentum=True")
            velocity *= np.float32(self.momentum)
            velocity += grad
            np.copyto(grad, velocity)
        grad *= np.float32(self.lr)
        master -= grad
