"""The attention matmuls of tiny random-weight transformers models (BERT, GPT-2, Llama with grouped-query
attention, ViT) as GemmMatmul modules: bit-identical to eager attention with empty slots, forward and
backward; filled by the configs that act on activations; removed by strip."""
import copy

import pytest
import torch

from thrifty.core import apply, layer_status, strip, wrap_layers
from thrifty.nn import GemmMatmul
from thrifty.nn.hf_attention import is_hf_attention
from thrifty.quant.train8 import Train8
from thrifty.sparse.actgrad import ActNM

transformers = pytest.importorskip("transformers")

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, attn_implementation="eager")


def _bert():
    cfg = transformers.BertConfig(hidden_size=16, vocab_size=40, max_position_embeddings=16, **SMALL)
    ids = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return transformers.BertModel(cfg), dict(input_ids=ids, attention_mask=mask), "last_hidden_state"


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=40, n_positions=16,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg), dict(input_ids=torch.randint(0, 40, (2, 7))), "logits"


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=16, vocab_size=40, num_key_value_heads=2,
                                   max_position_embeddings=16, **SMALL)
    return transformers.LlamaForCausalLM(cfg), dict(input_ids=torch.randint(0, 40, (2, 7))), "logits"


def _vit():
    cfg = transformers.ViTConfig(hidden_size=16, image_size=8, patch_size=4, num_channels=3, **SMALL)
    return transformers.ViTModel(cfg), dict(pixel_values=torch.randn(2, 3, 8, 8)), "last_hidden_state"


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit}


def _run(model, batch, field):
    model.zero_grad()
    out = getattr(model(**batch), field)
    out.sin().sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", MODELS)
def test_empty_matmul_slots_bit_identical_to_eager_and_strip_restores(arch):
    torch.manual_seed(0)
    model, batch, field = MODELS[arch]()
    model.train()  # dropout is 0.1 in these configs: same seeds, same masks
    model.config.attention_probs_dropout_prob = 0.0
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    want = _run(ref, batch, field)
    names = [n for n, _, _ in layer_status(model, matmuls=True) if n.endswith((".qk", ".pv"))]
    assert len(names) == 4 and not any(isinstance(m, GemmMatmul) for m in model.modules())
    got = wrap_layers(model, ["*.qk", "*.pv"])
    assert sorted(n for n, _ in got) == sorted(names) and model.config._attn_implementation == "thrifty"
    assert not any("thrifty" in k for k in model.config.to_dict())  # nothing of thrifty's goes into config.json
    torch.manual_seed(1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(want, _run(model, batch, field),
                                                                              strict=True))
    apply(model, Train8(), filter="*.qk")  # 8-bit Q K^T changes the output, P V unchanged
    attn = next(m for m in model.modules() if is_hf_attention(m))
    assert attn.qk.slots.input is not None and attn.pv.slots.empty()
    torch.manual_seed(1)
    changed = _run(model, batch, field)
    assert not torch.equal(changed[0], want[0]) and all(torch.isfinite(g).all() for g in changed[1:] if g is not None)
    plain = strip(copy.deepcopy(model))  # a copy knows what to restore too
    assert plain.config._attn_implementation == "eager" and not any(isinstance(m, GemmMatmul) for m in plain.modules())
    assert set(plain.state_dict()) == set(ref.state_dict())


def test_act_nm_on_scores_and_a_failed_apply_restores_the_model():
    torch.manual_seed(0)
    model, batch, field = _bert()
    model.eval()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    with pytest.raises(ValueError, match="cannot take 2:4"):
        from thrifty.sparse import NM
        apply(model, NM(2, 4), filter=["*.qk", "*.dense"])  # a matmul has no weight to prune
    assert model.config._attn_implementation == "eager" and not any(isinstance(m, GemmMatmul) for m in model.modules())
    apply(model, ActNM(2, 4), filter="*.pv")  # 2:4 attention probabilities along the keys
    attn = model.encoder.layer[0].attention.self
    seen = []
    attn.pv.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert not torch.equal(out, ref) and seen and seen[0].shape[-1] == 7
