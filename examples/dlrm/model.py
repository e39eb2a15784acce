"""The DLRM-style click model (Naumov et al. 2019), its validation metrics and the digests that
say two runs ended in the same place.

Tables `user`, `item` (nn.Embedding), `item_category` (nn.EmbeddingBag, mean over up to 3
categories, padding index 0), `hour`, `device`, `region` (small nn.Embedding), a bottom MLP for
the dense features, pairwise dot-product interactions and a top MLP.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlrm.data import N_DENSE


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DLRM(nn.Module):
    def __init__(self, n_users, n_items, n_cats, dim=16):
        super().__init__()
        self.tables = nn.ModuleDict({
            "user": nn.Embedding(n_users, dim),
            "item": nn.Embedding(n_items, dim),
            "item_category": nn.EmbeddingBag(n_cats + 1, dim, mode="mean", padding_idx=0),
            "hour": nn.Embedding(24, dim),
            "device": nn.Embedding(6, dim),
            "region": nn.Embedding(50, dim),
        })
        for t in self.tables.values():
            nn.init.normal_(t.weight, std=0.1)
        with torch.no_grad():
            self.tables["item_category"].weight[0].zero_()
        self.bottom = mlp([N_DENSE, 32, dim])
        n_vec = len(self.tables) + 1
        self.register_buffer("iu", torch.triu_indices(n_vec, n_vec, offset=1), persistent=False)
        self.top = mlp([dim + self.iu.shape[1], 64, 32, 1])

    def forward(self, user, item, cats, hour, device, region, dense):
        t = self.tables
        vecs = [self.bottom(dense), t["user"](user), t["item"](item), t["item_category"](cats),
                t["hour"](hour), t["device"](device), t["region"](region)]
        T = torch.stack(vecs, 1)                      # (B, 7, dim)
        Z = torch.bmm(T, T.transpose(1, 2))           # pairwise dot products
        inter = Z[:, self.iu[0], self.iu[1]]          # (B, 21)
        return self.top(torch.cat([vecs[0], inter], 1)).squeeze(1)


# --------------------------------------------------------------------------- metrics
def auc_score(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC via the rank-sum (Mann-Whitney U) formula, ties get their average rank."""
    scores = scores.double().flatten(); labels = labels.flatten() > 0.5
    n_pos = int(labels.sum()); n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_s, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()                 # 1-based rank of each tie group's last
    avg_rank = ends - (counts.double() - 1) / 2             # average rank inside the group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model, data, device, batch=8192):
    model.eval()
    logits = []
    n = data["label"].numel()
    for s in range(0, n, batch):
        b = {k: v[s:s + batch].to(device) for k, v in data.items() if k != "label"}
        logits.append(model(**b).float().cpu())
    model.train()
    if hasattr(model, "reshard"):  # FSDP2: the root keeps its parameters unsharded after a no_grad forward
        model.reshard()
    return val_metrics(torch.cat(logits), data["label"])


def val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Validation loss (binary cross-entropy of the logits) and AUC."""
    return {"loss": F.binary_cross_entropy_with_logits(logits, labels).item(), "auc": auc_score(logits, labels)}


# --------------------------------------------------------------------------- digests
def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def mask_digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.detach().bool().cpu().contiguous().numpy().tobytes()).hexdigest()


def state_digest(state: dict) -> str:
    """sha256 over a state dict's names and float32 values, in name order."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode()); h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_digest(net: nn.Module, sharded: bool = False) -> str:
    """sha256 over the model's state dict; sharded (FSDP2): the full state dict, a collective
    whose result only rank 0 holds (the others' digest is of nothing)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return state_digest(get_model_state_dict(net, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True)))
    return state_digest(net.state_dict())
