"""Stand-ins for torch_npu and flash-attn, for CPU tests of the NPU and CUDA code paths.

Each op takes exactly the documented arguments (names, defaults, layouts), asserts the
conventions our code must follow (mask polarity, explicit scale, cumulative lengths, statistic
shapes) and computes the documented result with plain float math, so the code under test is
checked both for calling the op correctly and for what it does with the answer.
"""

import types

import torch

NPU_MAX_TOKENS = 2147483647


def dense_attention(q, k, v, scale, masked=None):
    """(B, H, S, D) attention with an optional 'True = masked out' (B, 1, Sq, Sk) mask; also
    returns the row max and the row sum of exp(scores - max), as torch_npu's statistics are."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    exp = torch.exp(scores - row_max)
    row_sum = exp.sum(dim=-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", exp / row_sum, v), row_max[..., 0], row_sum[..., 0]


def _npu_statistic(x):
    """torch_npu returns softmax statistics as float32 (B, N, S, 8): the value repeated 8 times."""
    return x.float()[..., None].expand(*x.shape, 8).contiguous()


def fake_torch_npu():
    module = types.ModuleType("torch_npu")
    module.calls = []

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1.0, keep_prob=1.0, pre_tockens=NPU_MAX_TOKENS, next_tockens=NPU_MAX_TOKENS,
                             inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                             gen_mask_parallel=True, sync=False):
        module.calls.append(input_layout)
        assert scale != 1.0, "scale defaults to 1.0 in torch_npu: pass 1/sqrt(head_dim)"
        assert keep_prob == 1.0
        if input_layout == "BNSD":
            assert query.shape[1] == head_num
            if atten_mask is not None:
                assert atten_mask.dtype == torch.bool and atten_mask.shape == (query.shape[0], 1, query.shape[2], key.shape[2])
            out, row_max, row_sum = dense_attention(query, key, value, scale, atten_mask)
            return out, _npu_statistic(row_max), _npu_statistic(row_sum), None, 0, 0, 0
        assert input_layout == "TND", f"unexpected layout {input_layout}"
        assert query.shape[1] == head_num and actual_seq_qlen is not None and actual_seq_kvlen is not None
        assert actual_seq_qlen[-1] == query.shape[0] and actual_seq_kvlen[-1] == key.shape[0], "cumulative lengths"
        out, start_q, start_k = [], 0, 0
        for end_q, end_k in zip(actual_seq_qlen, actual_seq_kvlen):
            seg = [t.transpose(0, 1)[None] for t in (query[start_q:end_q], key[start_k:end_k], value[start_k:end_k])]
            out.append(dense_attention(*seg, scale)[0][0].transpose(0, 1))
            start_q, start_k = end_q, end_k
        return torch.cat(out), None, None, None, 0, 0, 0

    def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                                  atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                                  attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=NPU_MAX_TOKENS,
                                  next_tockens=NPU_MAX_TOKENS, inner_precise=0, seed=0, offset=0, numels=0,
                                  prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                                  gen_mask_parallel=True, sync=False):
        module.calls.append("grad:" + input_layout)
        assert input_layout == "BNSD" and query.shape[1] == head_num and keep_prob == 1.0
        assert scale_value != 1.0, "the backward's scale is scale_value, default 1.0: pass 1/sqrt(head_dim)"
        stats_shape = (*query.shape[:3], 8)
        for name, stat in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
            assert stat is not None and stat.shape == stats_shape and stat.dtype == torch.float32, f"{name}: (B, N, S, 8) float32"
        assert attention_in is not None and attention_in.shape == query.shape
        q, k, v, dy, out = (t.double() for t in (query, key, value, dy, attention_in))
        # P = exp(S - max) / sum, with the statistics given, not recomputed: that is the contract.
        probs = torch.exp(torch.einsum("bhnd,bhmd->bhnm", q, k) * scale_value - softmax_max[..., :1].double()) / softmax_sum[..., :1].double()
        grad_scores = probs * (torch.einsum("bhnd,bhmd->bhnm", dy, v) - (dy * out).sum(-1, keepdim=True))
        grads = (torch.einsum("bhnm,bhmd->bhnd", grad_scores, k) * scale_value,
                 torch.einsum("bhnm,bhnd->bhmd", grad_scores, q) * scale_value,
                 torch.einsum("bhnm,bhnd->bhmd", probs, dy))
        return (*(g.to(query.dtype) for g in grads), None)

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        module.calls.append("npu_rms_norm")
        assert gamma.shape == x.shape[-1:]
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd).type_as(x) * gamma, rstd

    def npu_rotary_mul(x, r1, r2):
        module.calls.append("npu_rotary_mul")
        assert x.dim() == 4 and r1.shape == r2.shape and r1.shape[-1] == x.shape[-1] and r1.shape[:2] == (1, 1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * r1 + torch.cat((-x2, x1), dim=-1) * r2  # rotate_half

    module.npu_fusion_attention = npu_fusion_attention
    module.npu_fusion_attention_grad = npu_fusion_attention_grad
    module.npu_rms_norm, module.npu_rotary_mul = npu_rms_norm, npu_rotary_mul
    return module


def fake_flash_attn(returns_lse: bool):
    """flash_attn (FlashAttention-2) or flash_attn_interface (FlashAttention-3, returns the LSE too)."""
    module = types.ModuleType("flash_attn")

    def check_dtypes(*tensors):
        assert all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors), "flash-attn supports fp16 and bf16 only"

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 4 and softmax_scale is not None and not causal
        check_dtypes(q, k, v)
        out = dense_attention(*(t.transpose(1, 2).double() for t in (q, k, v)), softmax_scale)[0].transpose(1, 2)  # (B, S, H, D)
        out = out.to(q.dtype)
        return (out, None) if returns_lse else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        check_dtypes(q, k, v)
        assert int(cu_seqlens_q[0]) == 0 and int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
        out = []
        for i in range(len(cu_seqlens_q) - 1):
            sq, sk = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])), slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            assert sq.stop - sq.start <= max_seqlen_q and sk.stop - sk.start <= max_seqlen_k
            seg = [t.transpose(0, 1)[None].double() for t in (q[sq], k[sk], v[sk])]
            out.append(dense_attention(*seg, softmax_scale)[0][0].transpose(0, 1))
        out = torch.cat(out).to(q.dtype)
        return (out, None) if returns_lse else out

    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module
