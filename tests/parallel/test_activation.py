import torch

from sora_dist.models import DiTConfig, VideoDiT
from sora_dist.parallel.activation import apply_activation_checkpointing, apply_compile

CFG = DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=4, num_heads=4)


def pair():
    torch.manual_seed(0)
    reference = VideoDiT(CFG)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    other = VideoDiT(CFG)
    other.load_state_dict(reference.state_dict())
    return reference, other


def outputs_and_grads(model):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 3, 6, 10, generator=g), torch.rand(2, generator=g) * 1000
    text, mask = torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool)
    out = model(x, t, text, mask)
    out.square().mean().backward()
    names = [n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") for n, _ in model.named_parameters()]
    return out.detach(), dict(zip(names, (p.grad for p in model.parameters())))


def assert_same(reference, other):
    out_a, grads_a = outputs_and_grads(reference)
    out_b, grads_b = outputs_and_grads(other)
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_selective_and_full_checkpointing_wrap_the_right_blocks_and_keep_gradients():
    reference, other = pair()
    assert apply_activation_checkpointing(other, "selective", every=2) == 2  # blocks 0 and 2 of 4
    wrapped = [type(b).__name__ for b in other.blocks]
    assert wrapped == ["CheckpointWrapper", "DiTBlock", "CheckpointWrapper", "DiTBlock"]
    assert_same(reference, other)
    reference, other = pair()
    assert apply_activation_checkpointing(other, "full", every=2) == 4
    assert_same(reference, other)
    assert apply_activation_checkpointing(VideoDiT(CFG), "none", every=2) == 0


def test_compiled_blocks_match_eager():
    reference, other = pair()
    apply_compile(other)
    assert_same(reference, other)
