"""Vector quantisation bottleneck of the VQ autoencoder (VQ-VAE, van den Oord et al. 2017).

`VectorQuantizer2` is taming-transformers' quantizer with the same parameter/buffer names and return
convention, so released VQ checkpoints load unchanged. Two optional training aids are added, both off by
default (and then no extra buffers exist, so the state dict equals the reference's):

- EMA codebook (`ema_decay`): codes follow exponential moving averages of the encoder outputs assigned to
  them instead of receiving gradients (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019), with
  Laplace smoothing of the cluster sizes so that rarely used codes do not divide by ~0.
- Dead-code restarts (`restart_unused_codes`): a code that no encoder output has picked for
  `restart_after_steps` training batches is moved onto a random encoder output of the current batch
  (Dhariwal et al. 2020, "Jukebox", sec. 3.1), so codebook collapse does not waste capacity.

Both only act in training mode. Under DDP the batch statistics are all-reduced and the restart vectors
broadcast from rank 0, so every process keeps the same codebook.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer2(nn.Module):
    """Nearest-neighbour quantisation of (b, e_dim, h, w) latents onto `n_e` learned codes.

    forward(z) returns ``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))`` as taming does:
    `z_q` carries straight-through gradients, `loss` is the codebook + commitment loss, `perplexity` and
    `min_encodings` are None (the loss module measures usage from the indices), and the indices are flat in
    (b, h, w) order, or shaped (b, h, w) with `sane_index_shape`. With `remap` (a .npy file of used code
    ids), indices are renumbered into that subset; codes outside it become `unknown_index` ("random",
    "extra" for one additional index, or a fixed int).

    `legacy=True` reproduces taming's loss, which swapped the weights of eq. 3 of van den Oord et al.:
    ``mean((sg[e] - z)²) + beta·mean((e - sg[z])²)``. `legacy=False` uses the paper's
    ``mean((e - sg[z])²) + beta·mean((sg[e] - z)²)``. The values are equal; the gradients differ.
    With `ema_decay`, only the commitment term ``beta·mean((sg[e] - z)²)`` remains (whatever `legacy`
    says): the codebook is then updated by the moving averages and takes no gradient.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, remap: Optional[str] = None,
                 unknown_index: Union[str, int] = "random", sane_index_shape: bool = False, legacy: bool = True,
                 ema_decay: Optional[float] = None, ema_epsilon: float = 1e-5,
                 restart_unused_codes: bool = False, restart_after_steps: int = 100) -> None:
        super().__init__()
        if n_e <= 0 or e_dim <= 0:
            raise ValueError(f"VectorQuantizer2 needs n_e > 0 and e_dim > 0, got n_e={n_e}, e_dim={e_dim}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) (typically 0.99), got {ema_decay}; use None to "
                             "train the codebook by gradient")
        if ema_epsilon <= 0:
            raise ValueError(f"ema_epsilon (Laplace smoothing) must be > 0, got {ema_epsilon}")
        if restart_after_steps < 1:
            raise ValueError(f"restart_after_steps must be >= 1, got {restart_after_steps}")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.restart_unused_codes = restart_unused_codes
        self.restart_after_steps = restart_after_steps

        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            used = torch.as_tensor(np.load(remap)).long().flatten()
            if used.numel() == 0 or used.unique().numel() != used.numel() or used.min() < 0 or used.max() >= n_e:
                raise ValueError(f"remap file {remap} must hold a non-empty list of distinct code ids in "
                                 f"[0, {n_e}), got {used.tolist()[:20]}{' ...' if used.numel() > 20 else ''}")
            self.register_buffer("used", used)
            self.re_embed = used.numel()
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")
            self.unknown_index = unknown_index
        else:
            self.re_embed = n_e

        if ema_decay is not None:
            # Every code starts as if one vector equal to it had been assigned: then weight = sum / size
            # holds from the first step and unused codes stay where they are instead of collapsing to 0.
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(n_e))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if restart_unused_codes:
            self.register_buffer("steps_since_used", torch.zeros(n_e, dtype=torch.long))

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Code ids -> positions in `used`; ids outside `used` become `unknown_index`."""
        lookup = torch.full((self.n_e,), -1, dtype=torch.long, device=inds.device)
        lookup[self.used] = torch.arange(self.used.numel(), device=inds.device)
        new = lookup[inds]
        unknown = new < 0
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=(int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` -> code ids; the "extra" unknown index maps to position 0 (as taming)."""
        if self.re_embed > self.used.numel():
            inds = torch.where(inds >= self.used.numel(), torch.zeros_like(inds), inds)
        return self.used[inds]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer2 expects latents of shape (b, {self.e_dim}, h, w) "
                             f"(e_dim = embed_dim), got {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flattened = z.view(-1, self.e_dim)
        codebook = self.embedding.weight
        # ||z - e||² = ||z||² + ||e||² - 2 z·e, as the reference computes it (same argmin ties).
        distances = (z_flattened.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                     - 2 * z_flattened @ codebook.t())
        min_encoding_indices = torch.argmin(distances, dim=1)
        z_q = self.embedding(min_encoding_indices).view(z.shape)

        # van den Oord et al. 2017, eq. 3: codebook term ||sg[z] - e||² and commitment term ||z - sg[e]||².
        commitment = torch.mean((z_q.detach() - z) ** 2)
        if self.ema_decay is not None:
            loss = self.beta * commitment
        else:
            codebook_term = torch.mean((z_q - z.detach()) ** 2)
            loss = commitment + self.beta * codebook_term if self.legacy else self.beta * commitment + codebook_term

        if self.training and (self.ema_decay is not None or self.restart_unused_codes):
            self._update_codebook(z_flattened.detach(), min_encoding_indices)

        # Straight-through estimator: forward uses the code, backward copies gradients to z.
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            min_encoding_indices = self.remap_to_used(min_encoding_indices)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, min_encoding_indices)

    @torch.no_grad()
    def _update_codebook(self, z_flattened: torch.Tensor, indices: torch.Tensor) -> None:
        """EMA step and/or dead-code restarts from this batch's encoder outputs and their assignments."""
        stats_dtype = self.ema_cluster_size.dtype if self.ema_decay is not None else torch.float32
        counts = torch.bincount(indices, minlength=self.n_e).to(stats_dtype)
        if self.ema_decay is not None:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_flattened.to(stats_dtype))
        if _distributed():  # the statistics of the global batch, so all ranks take the same step
            dist.all_reduce(counts)
            if self.ema_decay is not None:
                dist.all_reduce(sums)

        if self.ema_decay is not None:
            # N_i <- γ N_i + (1-γ) n_i ;  m_i <- γ m_i + (1-γ) Σ_j z_ij ;  e_i = m_i / N_i
            # (van den Oord et al. 2017, appendix A.1, eqs. 6-8).
            decay = self.ema_decay
            self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
            self.embedding.weight.data.copy_(self.ema_embed_sum / self._smoothed_cluster_size().unsqueeze(1))

        if self.restart_unused_codes:
            self._restart_dead_codes(z_flattened, counts)

    def _smoothed_cluster_size(self) -> torch.Tensor:
        """Laplace-smoothed N_i = (N_i + ε) / (n + K ε) · n, n = Σ N_i: never 0, same total."""
        total = self.ema_cluster_size.sum()
        return (self.ema_cluster_size + self.ema_epsilon) / (total + self.n_e * self.ema_epsilon) * total

    def _restart_dead_codes(self, z_flattened: torch.Tensor, counts: torch.Tensor) -> None:
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.steps_since_used >= self.restart_after_steps).squeeze(1)
        if dead.numel() == 0:
            return
        # Distinct encoder outputs when the batch has enough of them; drawn from the torch RNG.
        num_vectors = z_flattened.shape[0]
        uniform = torch.ones(num_vectors, device=z_flattened.device)
        picks = torch.multinomial(uniform, dead.numel(), replacement=num_vectors < dead.numel())
        new_codes = z_flattened[picks].to(self.embedding.weight.dtype)
        if _distributed():  # ranks see different batches; all adopt rank 0's choice
            dist.broadcast(new_codes, src=0)
        self.embedding.weight.data[dead] = new_codes
        if self.ema_decay is not None:
            # Restart the averages too, with the same "one assigned vector" prior as at construction.
            self.ema_embed_sum[dead] = new_codes.to(self.ema_embed_sum.dtype)
            self.ema_cluster_size[dead] = 1.0
        self.steps_since_used[dead] = 0

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[tuple[int, ...]]) -> torch.Tensor:
        """Code vectors for `indices`; with `shape` = (b, h, w, e_dim) returned as (b, e_dim, h, w)."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
