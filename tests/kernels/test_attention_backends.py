"""Every attention backend against the plain-PyTorch reference, forward and backward, including
the CUDA and Ascend ones through stand-in modules that enforce the documented argument contracts
of flash-attn and torch_npu (layouts, mask polarity, explicit scale, cumulative lengths) and
compute with the reference."""

import sys
import types

import pytest
import torch

from sora_dist.kernels import BACKENDS, attention, attention_varlen, select_attention_backend, set_attention_backend
from sora_dist.kernels.attention import reference_attention


def _dense_reference(q, k, v, scale, masked=None):
    """(B, H, S, D) attention with an optional 'True = masked out' (B, 1, Sq, Sk) mask."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)


def fake_torch_npu():
    module = types.ModuleType("torch_npu")
    module.calls = []

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                             prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                             gen_mask_parallel=True, sync=False):
        module.calls.append(input_layout)
        assert scale != 1.0, "scale defaults to 1.0 in torch_npu: pass 1/sqrt(head_dim)"
        assert keep_prob == 1.0
        if input_layout == "BNSD":
            assert query.shape[1] == head_num
            if atten_mask is not None:
                assert atten_mask.dtype == torch.bool and atten_mask.shape == (query.shape[0], 1, query.shape[2], key.shape[2])
            out = _dense_reference(query, key, value, scale, atten_mask)
        elif input_layout == "TND":
            assert query.shape[1] == head_num and actual_seq_qlen is not None and actual_seq_kvlen is not None
            assert actual_seq_qlen[-1] == query.shape[0] and actual_seq_kvlen[-1] == key.shape[0], "cumulative lengths"
            out, start_q, start_k = [], 0, 0
            for end_q, end_k in zip(actual_seq_qlen, actual_seq_kvlen):
                seg = [t.transpose(0, 1)[None] for t in (query[start_q:end_q], key[start_k:end_k], value[start_k:end_k])]
                out.append(_dense_reference(*seg, scale)[0].transpose(0, 1))
                start_q, start_k = end_q, end_k
            out = torch.cat(out)
        else:
            raise AssertionError(f"unexpected layout {input_layout}")
        return out, None, None, None, 0, 0, 0

    module.npu_fusion_attention = npu_fusion_attention
    return module


def fake_flash_attn(returns_lse: bool):
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 4 and softmax_scale is not None and not causal
        out = _dense_reference(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale).transpose(1, 2)  # (B, S, H, D)
        return (out, None) if returns_lse else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert int(cu_seqlens_q[0]) == 0 and int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
        out = []
        for i in range(len(cu_seqlens_q) - 1):
            sq, sk = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])), slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            assert sq.stop - sq.start <= max_seqlen_q and sk.stop - sk.start <= max_seqlen_k
            seg = [t.transpose(0, 1)[None] for t in (q[sq], k[sk], v[sk])]
            out.append(_dense_reference(*seg, softmax_scale)[0].transpose(0, 1))
        out = torch.cat(out)
        return (out, None) if returns_lse else out

    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu())
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(returns_lse=False))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_flash_attn(returns_lse=True))
    yield sys.modules["torch_npu"]
    set_attention_backend("sdpa")


CPU_RUNNABLE = ["sdpa", "reference", "flash2", "flash3", "npu"]  # cudnn needs a GPU


@pytest.mark.parametrize("backend", CPU_RUNNABLE)
@pytest.mark.parametrize("shape", [(2, 3, 10, 7, 16), (1, 4, 33, 5, 64), (3, 2, 17, 17, 30)], ids=["cross", "odd", "self"])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_reference_forward_and_backward(stand_ins, backend, shape, masked):
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, size, d, generator=g, dtype=torch.float64, requires_grad=True) for size in (n, m, m))
    key_mask = None
    if masked:
        key_mask = torch.ones(b, m, dtype=torch.bool)
        key_mask[0, m // 2 :] = False  # text padding
    expected = reference_attention(q, k, v, key_mask)
    grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    set_attention_backend(backend)
    out = attention(q, k, v, key_mask)
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        torch.testing.assert_close(got, want)


def test_npu_backend_uses_the_transpose_free_layout(stand_ins):
    set_attention_backend("npu")
    attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert stand_ins.calls == ["BNSD"]


@pytest.mark.parametrize("backend", ["sdpa", "flash2", "flash3", "npu"])
def test_varlen_attends_within_segments_only(stand_ins, backend):
    lengths = [5, 1, 9]
    g = torch.Generator().manual_seed(1)
    segments = [[torch.randn(n, 3, 16, generator=g, dtype=torch.float64) for _ in range(3)] for n in lengths]
    q, k, v = (torch.cat([s[i] for s in segments]) for i in range(3))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    set_attention_backend(backend)
    out = attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths))
    expected = torch.cat([reference_attention(*(t.transpose(0, 1)[None] for t in seg))[0].transpose(0, 1) for seg in segments])
    torch.testing.assert_close(out, expected)


def test_backend_choice_per_device(monkeypatch):
    found = {"flash_attn_interface": object(), "flash_attn": object()}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: found.get(name))
    assert select_attention_backend("cuda", (9, 0)) == "flash3"  # Hopper with FA3 installed
    assert select_attention_backend("cuda", (8, 0)) == "flash2"  # FA3 is Hopper-only
    del found["flash_attn"]
    assert select_attention_backend("cuda", (8, 0)) == "cudnn"
    assert select_attention_backend("npu") == "npu" and select_attention_backend("cpu") == "sdpa"
    assert set(CPU_RUNNABLE) | {"cudnn"} == set(BACKENDS)


def test_every_attention_of_the_model_goes_through_the_dispatch(stand_ins):
    from sora_dist.models import DiTConfig, VideoDiT

    model = VideoDiT(DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=3, num_heads=2))
    with torch.no_grad():  # away from the zero-output init, so the comparison below means something
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2) * 1000
    text, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, True, True]])
    expected = model(x, t, text, mask)
    set_attention_backend("npu")
    out = model(x, t, text, mask)
    assert stand_ins.calls == ["BNSD"] * (2 * 3)  # self- and cross-attention of each of 3 blocks
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
