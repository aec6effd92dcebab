"""VectorQuantizer: distances, the blocked nearest-code search, straight-through gradient, EMA,
masking, k-means init, restarts, autocast, and identical codebooks across DDP replicas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf

import speechvq.nn.quantizer as Q
from speechvq.cli._hydra import conf_dir
from speechvq.nn.quantizer import VectorQuantizer, kmeans, nearest_codes, sq_distances

# conf/quantizer/ema.yaml without its interpolated dim (tests set dim themselves)
EMA = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(
    conf_dir() / "quantizer" / "ema.yaml")).items() if k != "dim"}


def _vq(**kw) -> VectorQuantizer:
    """The EMA quantizer of conf/ at 8 codes of dimension 4 (+ ``kw``)."""
    return VectorQuantizer(**{**EMA, "n_codes": 8, "dim": 4, "dead_threshold": 0.0, **kw})


def _clusters(centres: torch.Tensor, per: int, noise: float = 0.05) -> torch.Tensor:
    """Frames around each centre (K, D) -> z (1, D, K * per)."""
    x = centres.repeat_interleave(per, 0) + noise * torch.randn(
        len(centres) * per, centres.shape[1]
    )
    return x.t().unsqueeze(0)


def test_one_matmul_distances_equal_bruteforce():
    torch.manual_seed(0)
    x, e = torch.randn(50, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    brute = ((x[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(sq_distances(x, e), brute)
    vq = _vq(n_codes=12, dim=16, kmeans_init=False)
    vq.codebook.copy_(e.float())
    z = x.float().t().unsqueeze(0)
    assert torch.equal(vq.encode(z)[0], brute.argmin(1))


# --------------------------------------------------------------------------- nearest_codes


def _assert_nearest(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> None:
    """indices (N,) are the fp64 nearest codes, except at true near-ties: a different code only
    where its exact distance is within fp32 rounding (1e-5 of ||x||^2 + ||e||^2) of the best."""
    d = sq_distances(x.double(), codebook.double())
    assert indices.shape == (x.shape[0],) and indices.dtype == torch.long
    best = d.argmin(1)
    if x.shape[0] == 0:
        return
    gap = d.gather(1, indices[:, None])[:, 0] - d.gather(1, best[:, None])[:, 0]
    scale = x.double().pow(2).sum(1) + codebook.double().pow(2).sum(1).max()
    assert (gap <= 1e-5 * scale).all(), (gap / scale).max()
    assert (indices != best).float().mean() < 1e-3  # near-ties are rare, not the rule


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    ("n", "dim", "k", "block_rows"),
    [
        (1000, 16, 512, 37),  # blocks that do not divide N; chunked CPU argmin (K = 8 x 64)
        (999, 64, 2048, None),  # default blocks, the benchmark's shape family
        (257, 8, 300, 64),  # K not a multiple of the argmin chunk: plain argmin
        (130, 5, 256, 1000),  # one block larger than N
        (50, 3, 1, 7),  # a single code
        (1, 4, 768, None),  # a single frame
        (0, 4, 5, None),  # no frames
    ],
)
def test_nearest_codes_equals_float64_reference(n, dim, k, block_rows, normalize):
    torch.manual_seed(n + k)
    x = 3.0 * torch.randn(n, dim) + 1.0
    codebook = 2.0 * torch.randn(k, dim)
    if normalize:  # the quantizer's cosine mode: both sides unit length
        x, codebook = F.normalize(x, dim=-1), F.normalize(codebook, dim=-1)
    indices = nearest_codes(x, codebook, block_rows=block_rows)
    _assert_nearest(x, codebook, indices)
    # cached norms and any other blocking give the very same answer
    norms = codebook.pow(2).sum(1)
    assert torch.equal(nearest_codes(x, codebook, norms, block_rows=5), indices)


@pytest.mark.parametrize("k", [10, 512])
def test_nearest_codes_exact_ties_go_to_the_lowest_index(k):
    """Small integers make every distance exact in fp32: ties are real and common, and (as
    ``argmin``) the first of the tied codes wins, with and without the chunked CPU argmin."""
    torch.manual_seed(k)
    x = torch.randint(-2, 3, (3000, 6)).float()
    codebook = torch.randint(-2, 3, (k, 6)).float()
    codebook[k // 2 :] = codebook[: k - k // 2]  # duplicated codes: the copy must never win
    expected = sq_distances(x.double(), codebook.double()).argmin(1)
    assert torch.equal(nearest_codes(x, codebook, block_rows=333), expected)
    assert torch.equal(sq_distances(x, codebook).argmin(1), expected)  # the old path agrees


@pytest.mark.parametrize("k", [256, 512, 1024])
def test_chunked_cpu_argmin_is_argmin_with_ties_nan_and_inf(k):
    torch.manual_seed(k)
    scores = torch.randint(0, 40, (500, k)).float()  # many exact ties
    scores[3, 100] = float("nan")
    scores[3, 7] = float("nan")  # argmin's NaN rule: the first NaN is the minimum
    scores[4] = float("inf")
    scores[5, -1] = -float("inf")
    scores[6, 0] = scores[6, 64] = scores[6, -1] = -5.0  # ties across chunks
    out = torch.empty(500, dtype=torch.long)
    Q._argmin_rows_(scores, out)
    assert torch.equal(out, scores.argmin(1))
    assert out[3] == 7 and out[6] == 0


def test_nearest_codes_is_fp32_under_autocast_and_upcasts_half_inputs():
    torch.manual_seed(0)
    x, codebook = 300 * torch.randn(400, 8), 300 * torch.randn(512, 8)
    expected = nearest_codes(x, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nearest_codes(x, codebook), expected)
    half = x.bfloat16()
    assert torch.equal(nearest_codes(half, codebook), nearest_codes(half.float(), codebook))


def test_nearest_codes_rejects_bad_shapes():
    with pytest.raises(ValueError, match="codebook"):
        nearest_codes(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least one code"):
        nearest_codes(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="block_rows"):
        nearest_codes(torch.randn(4, 3), torch.randn(5, 3), block_rows=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nearest_codes_on_cuda_matches_reference():
    torch.manual_seed(0)
    x, codebook = torch.randn(5000, 64), torch.randn(512, 64)
    indices = nearest_codes(x.cuda(), codebook.cuda(), block_rows=777)
    assert indices.device.type == "cuda"
    _assert_nearest(x, codebook, indices.cpu())


@pytest.mark.parametrize("normalize", [False, True])
def test_training_extraction_and_kmeans_use_the_fast_path_with_the_old_codes(
    normalize, monkeypatch
):
    """forward (training and eval), encode and k-means all go through ``nearest_codes`` and give
    the codes the old ``sq_distances(...).argmin(1)`` gave."""
    torch.manual_seed(0)
    centres = 4.0 * torch.randn(64, 16)
    z_init, z = _clusters(centres, 20, noise=0.5), _clusters(centres, 30, noise=0.5)
    calls = []

    def counting(x, codebook, *args, **kwargs):
        calls.append(x.shape[0])
        return nearest_codes(x, codebook, *args, **kwargs)

    def old(x, codebook, *args, **kwargs):
        return sq_distances(x, codebook).argmin(1)

    def trained(search) -> tuple[VectorQuantizer, torch.Tensor]:
        monkeypatch.setattr(Q, "nearest_codes", search)
        torch.manual_seed(1)
        vq = _vq(n_codes=512, dim=16, normalize=normalize).train()
        _, train_indices, _ = vq(z_init)  # k-means init, then the training lookup
        return vq, train_indices

    vq, train_indices = trained(counting)
    # k-means (10 Lloyd steps) + the training lookup
    assert calls == [z_init.shape[2]] * (10 + 1)
    vq_old, train_indices_old = trained(old)
    monkeypatch.setattr(Q, "nearest_codes", counting)
    assert torch.equal(vq.codebook, vq_old.codebook)  # the same k-means and EMA step
    assert torch.equal(train_indices, train_indices_old)

    calls.clear()
    vq.eval()
    codes = vq.encode(z)
    _, eval_codes, _ = vq(z)
    assert calls == [z.shape[2]] * 2
    x = vq._prepare(z[0].t())
    assert torch.equal(codes[0], sq_distances(x, vq.decode_codes()).argmin(1))
    assert torch.equal(eval_codes, codes)


def test_empty_batch_encodes_to_no_codes():
    vq = _vq(n_codes=512, dim=4, kmeans_init=False).eval()
    assert vq.encode(torch.randn(2, 4, 0)).shape == (2, 0)
    _, indices, _ = vq(torch.randn(2, 4, 0))
    assert indices.shape == (2, 0)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    vq = _vq(kmeans_init=False).eval()
    z = torch.randn(2, 4, 7, requires_grad=True)
    z_q, _, _ = vq(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)
    # forward values are the codes themselves
    assert torch.allclose(z_q, vq.decode(vq.encode(z)))


def test_commitment_loss_gradient_and_codebook_loss_in_vq_mode():
    torch.manual_seed(0)
    vq = _vq(ema=False, kmeans_init=False).train()
    assert isinstance(vq.codebook, torch.nn.Parameter)
    z = torch.randn(2, 4, 6, requires_grad=True)
    _, _, losses = vq(z)
    (losses["vq_codebook"] + losses["vq_commit"]).backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0
    # EMA mode: the codebook is a buffer and the codebook term is a constant 0
    ema = _vq(kmeans_init=False).train()
    assert "codebook" not in dict(ema.named_parameters())
    assert ema(torch.randn(1, 4, 5))[2]["vq_codebook"].item() == 0.0


def test_ema_moves_codes_toward_assigned_frames_and_ignores_padding():
    torch.manual_seed(0)
    vq = _vq(n_codes=4, dim=2, kmeans_init=False, decay=0.9).train()
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    vq.codebook.copy_(codes)
    vq.embed_sum.copy_(codes)  # cluster_size starts at ones
    valid = torch.tensor([[1.0, 1.0], [1.0, 0.6], [0.6, 1.0]])  # all nearest to code 0
    padding = torch.full((5, 2), 9.0)  # nearest to code 1: must not count anywhere
    z = torch.cat([valid, padding]).t().unsqueeze(0)  # (1, 2, 8)
    mask = torch.tensor([[True] * 3 + [False] * 5])

    _, indices, losses = vq(z, mask)

    assert indices[0, :3].tolist() == [0, 0, 0] and indices[0, 3:].tolist() == [1] * 5
    # code 0: EMA of sums / EMA of counts (Laplace smoothing changes it by ~eps only)
    expected0 = (0.9 * codes[0] + 0.1 * valid.sum(0)) / (0.9 + 0.1 * 3)
    torch.testing.assert_close(vq.codebook[0], expected0, atol=1e-3, rtol=0)
    assert vq.codebook[0].norm() > 0.2  # it moved toward the frames
    # code 1 got only padded frames: it must not move toward them
    torch.testing.assert_close(vq.codebook[1], codes[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(vq.cluster_size, torch.tensor([1.2, 0.9, 0.9, 0.9]))
    # losses and stats see the valid frames only
    expected_commit = (valid - codes[0]).pow(2).mean()
    torch.testing.assert_close(losses["vq_commit"], expected_commit)
    assert losses["perplexity"].item() == pytest.approx(1.0)
    assert losses["usage"].item() == pytest.approx(0.25)


def test_kmeans_init_marks_inited_and_is_not_redone_after_load():
    torch.manual_seed(0)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 3.0]])
    vq = _vq(n_codes=4)
    vq.eval()(_clusters(centres, 10))
    assert not bool(vq.inited)  # evaluation never initialises
    vq.train()(_clusters(centres, 10))
    assert bool(vq.inited)
    nearest = sq_distances(centres, vq.codebook).min(1).values
    assert nearest.max() < 0.05  # every cluster got a code

    fresh = _vq(n_codes=4)
    fresh.load_state_dict(vq.state_dict())
    before = fresh.codebook.clone()
    fresh.train()(_clusters(centres + 50.0, 10))  # far away data: k-means would jump there
    assert bool(fresh.inited)
    assert (fresh.codebook - before).abs().max() < 50.0 * 0.02  # only an EMA step of 1 %


def test_kmeans_function_recovers_clusters():
    torch.manual_seed(0)
    centres = torch.randn(5, 3) * 10
    x = _clusters(centres, 30)[0].t()
    means, counts = kmeans(x, 5, 20)
    assert counts.sum() == 150
    assert sq_distances(centres, means).min(1).values.max() < 0.1


def test_dead_codes_restarted_from_valid_frames():
    torch.manual_seed(0)
    vq = _vq(n_codes=6, dim=2, kmeans_init=False, dead_threshold=1.0).train()
    codes = torch.tensor([[0.0, 0.0], [5.0, 5.0]] + [[100.0, 100.0]] * 4)
    vq.codebook.copy_(codes)
    vq.embed_sum.copy_(codes)
    frames = torch.cat([0.1 * torch.randn(10, 2), 5 + 0.1 * torch.randn(10, 2)])
    padding = torch.full((6, 2), -100.0)
    z = torch.cat([frames, padding]).t().unsqueeze(0)
    mask = torch.tensor([[True] * 20 + [False] * 6])

    _, _, losses = vq(z, mask)

    assert losses["dead_codes"].item() == 4  # codes 2..5 got no frame: 0.99 < 1
    restarted = vq.codebook[2:]
    assert (restarted.abs() < 50).all()  # none left at +100, none taken from padding (-100)
    # each restarted code is one of the valid frames of the batch
    assert sq_distances(restarted, frames).min(1).values.max() < 1e-10
    assert torch.all(vq.cluster_size[2:] == 1.0)
    torch.testing.assert_close(vq.embed_sum[2:], restarted)


def test_decode_encode_round_trip():
    torch.manual_seed(0)
    vq = _vq(n_codes=16, dim=8).train()
    vq(torch.randn(3, 8, 20))
    vq.eval()
    z = torch.randn(3, 8, 11)
    z_q, indices, _ = vq(z)
    assert indices.shape == (3, 11) and indices.dtype == torch.long
    assert torch.equal(vq.encode(z), indices)
    assert torch.equal(vq.decode(indices), z_q)


def test_fp32_inside_under_bf16_autocast():
    torch.manual_seed(0)
    vq = _vq(n_codes=32, dim=8, dead_threshold=1.0).train()
    # big activations: in bf16 (8-bit mantissa) ||z||^2 - 2 z.e + ||e||^2 cancels catastrophically
    z = (torch.randn(2, 8, 30) * 300).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, _, losses = vq(z)  # k-means init, EMA update and restarts under autocast
        assert z_q.dtype == torch.float32 and vq.codebook.dtype == torch.float32
        assert torch.isfinite(z_q).all() and torch.isfinite(vq.codebook).all()
        assert all(torch.isfinite(v).all() for v in losses.values())
        _, indices, _ = vq.eval()(z)
    assert torch.equal(indices, vq.encode(z.float()))


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different initial buffers and RNG on each rank
        vq = _vq(n_codes=16, decay=0.5, kmeans_iters=5, dead_threshold=1.0).train()
        states, dead = [], []
        for step in range(6):
            # different data per rank; a jump at step 3 strands most codes (-> restarts)
            z = torch.randn(2, 4, 24) + 2.0 * rank + (20.0 if step >= 3 else 0.0)
            mask = torch.ones(2, 24, dtype=torch.bool)
            mask[1, 10 + rank * 5 :] = False
            _, _, losses = vq(z, mask)
            dead.append(float(losses["dead_codes"]))
            states.append({k: v.clone() for k, v in vq.state_dict().items()})
        torch.save({"states": states, "dead": dead}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_keep_identical_codebooks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for step, (s0, s1) in enumerate(zip(r0["states"], r1["states"], strict=True)):
        for key in ("codebook", "embed_sum", "cluster_size", "inited"):
            assert torch.equal(s0[key], s1[key]), (step, key)
    # the run had steps with restarts (broadcast from rank 0) and without (EMA all-reduce alone)
    assert r0["dead"] == r1["dead"]
    assert any(d > 0 for d in r0["dead"]) and any(d == 0 for d in r0["dead"]), r0["dead"]


def test_normalized_lookup_is_cosine_and_scale_free():
    torch.manual_seed(0)
    vq = _vq(n_codes=16, dim=8, normalize=True).train()
    vq(torch.randn(2, 8, 40))
    vq.eval()
    z = torch.randn(2, 8, 30)
    z_q, indices, losses = vq(z)
    # codes are unit vectors and the lookup ignores the latents' length
    torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 30))
    assert torch.equal(vq.encode(3.0 * z), indices)
    cos = torch.nn.functional.normalize(z.transpose(1, 2), dim=-1) @ vq.decode_codes().t()
    assert torch.equal(cos.argmax(-1), indices)
    assert torch.isfinite(losses["vq_commit"])
