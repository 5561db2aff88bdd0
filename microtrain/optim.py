"""SGD on compact gradients: only the trained rows of each layer are touched."""
from __future__ import annotations

import numpy as np


class SGD:
    """Plain SGD with optional momentum and weight decay (PyTorch's formulation).

    The trained rows live in the executor's arena (``master``); after each update they are
    written back into the layer's weights, which the forward pass reads. Unselected rows are
    never written.
    """

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 row_scales: dict[str, tuple[np.ndarray | None, np.ndarray | None]] | None = None):
        """``row_scales``: layer name -> (weight, bias) step multipliers, one per trained output
        channel in the selection's order ((rows,) float32 each, or None for 1): a diagonal
        preconditioner fixed before training (TinyTrain+'s per-channel RMS normalisation)."""
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr must be > 0 and momentum, weight_decay >= 0 "
                             f"(got {lr}, {momentum}, {weight_decay})")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.row_scales = {}
        for name, parts in (row_scales or {}).items():
            # shaped once to broadcast over a compact gradient (rows, ...): no allocation per step
            self.row_scales[name] = tuple(None if a is None else np.asarray(a, np.float32) for a in parts)

    def step(self, run) -> None:
        """One update of every trained row of ``run`` (an ``autograd.Executor`` after ``backward``),
        from its gradients, written back into the layers' weights; ``ValueError`` when momentum
        is asked of an executor planned without momentum buffers."""
        for node, upd in run.trained():
            dw, db = run.grad(node.name)
            mw, mb = run.master(node.name)
            vw, vb = run.momentum(node.name)
            scales = self.row_scales.get(node.name, (None, None))
            for grad, master, velocity, rows, param, scale in ((dw, mw, vw, upd.weight, node.weight, scales[0]),
                                                               (db, mb, vb, upd.bias, node.bias, scales[1])):
                if grad is None:
                    continue
                if scale is not None:  # in place on the gradient buffer, dead after this step
                    np.multiply(grad, scale.reshape((-1,) + (1,) * (grad.ndim - 1)), out=grad)
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
