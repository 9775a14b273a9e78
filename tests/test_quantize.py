"""VectorQuantizer2: taming's behaviour (remap, index shapes, legacy loss) and the EMA / restart extensions."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.modules.vqvae.quantize import VectorQuantizer2


def quantizer_with_codes(codes, **kwargs):
    codes = torch.as_tensor(codes, dtype=torch.float32)
    q = VectorQuantizer2(codes.shape[0], codes.shape[1], beta=0.25, **kwargs)
    with torch.no_grad():
        q.embedding.weight.copy_(codes)
    if "ema_decay" in kwargs and kwargs["ema_decay"] is not None:
        q.ema_embed_sum.copy_(codes)  # the average starts at the codes, as construction does
    return q


def latents(points):
    """Points (n, d) as a (1, d, 1, n) latent: one row of n positions."""
    return torch.as_tensor(points, dtype=torch.float32).t()[None, :, None, :].contiguous()


def test_default_state_dict_keys_equal_reference():
    assert list(VectorQuantizer2(8, 3, 0.25).state_dict()) == ["embedding.weight"]
    ema = VectorQuantizer2(8, 3, 0.25, ema_decay=0.99, restart_unused_codes=True)
    assert sorted(ema.state_dict()) == ["ema_cluster_size", "ema_embed_sum", "embedding.weight", "steps_since_used"]


def test_indices_are_nearest_codes_flat_or_sane_shaped():
    codes = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    z = latents([[0.9, 0.1], [0.1, 0.8], [0.1, 0.1], [0.6, 0.0]])
    z_q, loss, (perplexity, encodings, indices) = quantizer_with_codes(codes)(z)
    assert perplexity is None and encodings is None
    assert indices.tolist() == [1, 2, 0, 1]
    torch.testing.assert_close(z_q, latents([[1, 0], [0, 1], [0, 0], [1, 0]]))
    _, _, (_, _, sane) = quantizer_with_codes(codes, sane_index_shape=True)(z)
    assert sane.shape == (1, 1, 4) and sane.flatten().tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError, match="e_dim"):
        quantizer_with_codes(codes)(torch.zeros(1, 3, 2, 2))


def test_remap_renumbers_codes_and_round_trips(tmp_path):
    codes = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)  # code i = (i, i)
    used_file = tmp_path / "used.npy"
    np.save(used_file, np.array([1, 3, 5]))
    z = latents([[3.1, 3.0], [5.0, 4.9], [0.1, 0.0], [1.0, 1.2]])  # codes 3, 5, 0 (not used), 1

    extra = quantizer_with_codes(codes, remap=str(used_file), unknown_index="extra")
    assert sorted(extra.state_dict()) == ["embedding.weight", "used"]
    _, _, (_, _, indices) = extra(z)
    assert indices.tolist() == [1, 2, 3, 0]  # positions in `used`; 3 is the extra "unknown" index
    entries = extra.get_codebook_entry(indices, shape=None)
    # The unknown index decodes as position 0, i.e. the first used code (as taming).
    torch.testing.assert_close(entries[:, 0], torch.tensor([3.0, 5.0, 1.0, 1.0]))

    fixed = quantizer_with_codes(codes, remap=str(used_file), unknown_index=2)
    assert fixed(z)[2][2].tolist() == [1, 2, 2, 0]

    torch.manual_seed(0)
    randomised = quantizer_with_codes(codes, remap=str(used_file))(z)[2][2]
    assert randomised[[0, 1, 3]].tolist() == [1, 2, 0] and 0 <= randomised[2] < 3
    torch.manual_seed(0)
    assert torch.equal(quantizer_with_codes(codes, remap=str(used_file))(z)[2][2], randomised)

    np.save(used_file, np.array([1, 1]))
    with pytest.raises(ValueError, match="distinct code ids"):
        VectorQuantizer2(8, 2, 0.25, remap=str(used_file))


def test_get_codebook_entry_with_shape_gives_nchw():
    q = VectorQuantizer2(16, 3, 0.25)
    indices = torch.randint(16, (2, 4, 5))
    z_q = q.get_codebook_entry(indices.reshape(-1), shape=(2, 4, 5, 3))
    assert z_q.shape == (2, 3, 4, 5)
    torch.testing.assert_close(z_q[1, :, 2, 3], q.embedding.weight[indices[1, 2, 3]])


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_flag_swaps_commitment_and_codebook_weights(legacy):
    codes = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    z = latents([[0.5, -0.5], [1.5, 2.5], [2.0, 1.0]]).requires_grad_(True)
    q = quantizer_with_codes(codes, legacy=legacy)
    _, loss, (_, _, indices) = q(z)
    e = codes[indices].t()[None, :, None, :]
    mse = ((e - z.detach()) ** 2).mean()
    torch.testing.assert_close(loss, 1.25 * mse)  # the value does not depend on `legacy`
    loss.backward()
    commitment_weight, codebook_weight = (1.0, 0.25) if legacy else (0.25, 1.0)
    numel = z.numel()
    torch.testing.assert_close(z.grad, commitment_weight * 2 * (z.detach() - e) / numel)
    expected_codebook_grad = torch.zeros_like(codes).index_add_(
        0, indices, codebook_weight * 2 * (e - z.detach())[0, :, 0, :].t() / numel)
    torch.testing.assert_close(q.embedding.weight.grad, expected_codebook_grad)


def test_straight_through_gradient_reaches_encoder_output():
    q = quantizer_with_codes([[0.0, 0.0], [1.0, 1.0]])
    z = latents([[0.2, 0.1], [0.9, 1.2]]).requires_grad_(True)
    z_q, _, _ = q(z)
    (z_q * 3.0).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))


def test_ema_update_matches_closed_form_and_converges_to_cluster_means():
    decay, eps = 0.5, 1e-5
    q = quantizer_with_codes([[0.0, 0.0], [10.0, 10.0]], ema_decay=decay, ema_epsilon=eps)
    assert not q.embedding.weight.requires_grad
    z = latents([[1.0, 0.0], [0.0, 1.0], [9.0, 10.0]]).requires_grad_(True)
    _, loss, (_, _, indices) = q.train()(z)
    assert indices.tolist() == [0, 0, 1]
    # Only the commitment term, with weight beta (van den Oord et al. 2017, appendix A.1).
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]])
    torch.testing.assert_close(loss, 0.25 * ((old - z.detach()[0, :, 0, :].t()) ** 2).mean())

    # N_i = γ·1 + (1-γ)·n_i ; m_i = γ·e_i + (1-γ)·Σ z ; e_i = m_i / smoothed N_i.
    size = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1])
    total = size.sum()
    smoothed = (size + eps) / (total + 2 * eps) * total
    sums = torch.tensor([[0.5 * 0 + 0.5 * 1.0, 0.5 * 0 + 0.5 * 1.0], [0.5 * 10 + 0.5 * 9, 0.5 * 10 + 0.5 * 10]])
    torch.testing.assert_close(q.ema_cluster_size, size)
    torch.testing.assert_close(q.ema_embed_sum, sums)
    torch.testing.assert_close(q.embedding.weight, sums / smoothed[:, None])
    torch.testing.assert_close(q.embedding.weight, torch.tensor([[1 / 3, 1 / 3], [9.5, 10.0]]), atol=1e-4, rtol=0)

    for _ in range(40):
        q(z)
    torch.testing.assert_close(q.embedding.weight, torch.tensor([[0.5, 0.5], [9.0, 10.0]]), atol=1e-4, rtol=0)

    frozen = q.embedding.weight.clone()
    q.eval()(latents([[100.0, 100.0]]))
    assert torch.equal(q.embedding.weight, frozen)  # no updates outside training


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_dead_code_restart_moves_unused_code_onto_batch_vector(ema_decay):
    codes = [[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]]  # code 2 is never the nearest
    points = [[0.1, 0.0], [0.9, 1.0], [0.2, 0.1], [1.1, 0.8]]

    def run():
        torch.manual_seed(123)
        q = quantizer_with_codes(codes, ema_decay=ema_decay, restart_unused_codes=True, restart_after_steps=2).train()
        q(latents(points))
        # Unused once: kept (up to the EMA's Laplace smoothing).
        torch.testing.assert_close(q.embedding.weight[2], torch.tensor([50.0, 50.0]), atol=1e-3, rtol=0)
        assert q.steps_since_used.tolist() == [0, 0, 1]
        q(latents(points))
        return q

    q = run()
    revived = q.embedding.weight[2]
    assert any(torch.equal(revived, torch.tensor(p)) for p in points)
    assert q.steps_since_used.tolist() == [0, 0, 0]
    if ema_decay is not None:
        assert torch.equal(q.ema_embed_sum[2], revived) and q.ema_cluster_size[2] == 1.0
    assert torch.equal(run().embedding.weight, q.embedding.weight)  # deterministic given the torch RNG
    # The revived code is now the nearest for the vector it was placed on.
    assert 2 in q(latents([revived.tolist()]))[2][2].tolist()


def _ddp_worker(rank, world_size, init_file, batches, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # ranks draw differently: restarts must still agree
        q = quantizer_with_codes([[0.0, 0.0], [10.0, 10.0], [99.0, 99.0]], ema_decay=0.5,
                                 restart_unused_codes=True, restart_after_steps=1).train()
        q(latents(batches[rank]))
        results[rank] = {k: v.clone() for k, v in q.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_ema_statistics_are_all_reduced_and_restarts_broadcast_under_ddp(tmp_path):
    batches = [[[1.0, 0.0], [9.0, 10.0]], [[0.0, 1.0], [0.0, 2.0], [11.0, 10.0]]]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), batches, results), nprocs=2, join=True)
    rank0, rank1 = results[0], results[1]
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Codes 0 and 1 equal a single process seeing both batches at once.
    single = quantizer_with_codes([[0.0, 0.0], [10.0, 10.0], [99.0, 99.0]], ema_decay=0.5).train()
    single(latents(batches[0] + batches[1]))
    torch.testing.assert_close(rank0["embedding.weight"][:2], single.embedding.weight[:2])
    torch.testing.assert_close(rank0["ema_cluster_size"][:2], single.ema_cluster_size[:2])
    # Code 2 (unused) was restarted onto one of rank 0's vectors, on both ranks.
    assert any(torch.equal(rank0["ema_embed_sum"][2], torch.tensor(p)) for p in batches[0])
