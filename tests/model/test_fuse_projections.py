"""`Pixtral.fuse_projections`: one matmul for q/k/v and one for gate/up, same model otherwise."""

from __future__ import annotations

import torch

from pixtral.model.decoder import Attention
from pixtral.model.layers import FeedForward
from pixtral.train.lora import apply_lora
from tests.conftest import random_model


def test_fused_model_gives_the_same_logits_and_state_dict():
    model = random_model("tiny")
    images = [torch.randn(3, 32, 48)]
    slots = [model.image_token_id] * model.image_token_counts(images)[0]
    ids = torch.tensor([1] + slots + torch.randint(1000, 5000, (20,)).tolist())
    with torch.no_grad():
        before = model(ids, images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    fused = [m for m in model.modules() if isinstance(m, (Attention, FeedForward))]
    assert fused and all((m.wqkv if isinstance(m, Attention) else m.w13) is not None for m in fused)
    attn = model.layers[0].attention
    # The parameters are views into the fused weight: no second copy of the weights.
    assert attn.wq.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()
    assert attn.wv.weight.data_ptr() == attn.wqkv[-attn.wv.weight.shape[0]:].data_ptr()
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], state[k]) for k in state)
    with torch.no_grad():
        after = model(ids, images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert before.std() > 0.5  # logits spread: a wrong split would not pass the comparison above


def test_lora_wrapped_projections_are_left_unfused():
    model = random_model("tiny")
    apply_lora(model, rank=2, alpha=4.0, targets=["wq", "w1"])
    model.fuse_projections()
    layer = model.layers[0]
    assert layer.attention.wqkv is None and layer.feed_forward.w13 is None


def prompt(model):
    images = [torch.randn(3, 32, 48)]
    slots = [model.image_token_id] * model.image_token_counts(images)[0]
    return torch.tensor([1] + slots + torch.randint(1000, 5000, (20,)).tolist()), images


def test_fused_weights_follow_in_place_loads_and_give_way_to_casts_and_training():
    torch.manual_seed(1)
    model, other = random_model("tiny", seed=0), random_model("tiny", seed=1)
    ids, images = prompt(model)
    model.fuse_projections()
    # An in-place load writes through the views into the fused weights: the new weights are served.
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images), other(ids, images), rtol=1e-5, atol=1e-5)
    assert model.layers[0].attention.wqkv is not None
    # Gradients recorded: the separate projections run, so their parameters get gradients.
    model(ids, images).logsumexp(-1).sum().backward()
    assert model.layers[0].attention.wq.weight.grad is not None
    assert model.layers[0].feed_forward.w3.weight.grad is not None
    # A cast makes new parameters: the stale fused weights are dropped, not served.
    model.double()
    with torch.no_grad():
        out = model(ids, [i.double() for i in images])
    assert model.layers[0].attention.wqkv is None and model.layers[0].feed_forward.w13 is None
    torch.testing.assert_close(out.float(), other(ids, images), rtol=1e-4, atol=1e-4)
