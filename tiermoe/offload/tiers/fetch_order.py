"""The order in which a forward pass asks the store for a layer's experts; the engine and the simulator share it."""

from __future__ import annotations

import numpy as np


def fetch_order(ids: np.ndarray) -> tuple[list[int], list[int]]:
    """The distinct experts of a batch's routing `ids` [T, A] and how many tokens use each, ordered by the latest
    token that uses each (ties by id); entries below 0 (a layer not computed for a token) are skipped.

    A store serves a request that does not fit its budget in turns (a long prefill), so what stays resident is what
    it served last: in this order, the experts of the prompt's last tokens, which decode is the likeliest to reuse
    (bench/prefill_order.py measures it against ascending id order).
    """
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)[ids >= 0]  # [N] token of each entry
    unique, inverse, counts = np.unique(ids[ids >= 0], return_inverse=True, return_counts=True)  # [U], [N], [U]
    latest = np.full(len(unique), -1)
    np.maximum.at(latest, inverse, rows)
    order = np.argsort(latest, kind="stable")  # stable: ties keep ascending id order
    return unique[order].tolist(), counts[order].tolist()
