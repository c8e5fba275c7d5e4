"""Attention heads in the channel engine: whole heads go (q/k/v rows, output-projection columns), the module's
head counts are updated so it still runs, and shrinking equals masking to 1e-5 on every attention form: the zoo's
ViT, timm-style fused qkv, Hugging Face BERT-style self-attention with keyword inputs, grouped-query attention,
and a block only the user can describe."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from architectures import AttentionBlock, random_plan
from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.channels.heads import AttentionSpec, find_attention
from prunekit.channels.model_io import call_model, output_difference
from prunekit.models import create_model
from prunekit.models.attention import PrunableMultiheadAttention


def _attend(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


class TimmAttention(nn.Module):
    """timm's layout: one fused qkv projection, ``num_heads`` and ``head_dim`` attributes, ``proj``."""

    def __init__(self, dim=24, num_heads=6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(_attend(q, k, v).transpose(1, 2).reshape(b, n, -1))


class TimmBlock(nn.Module):
    def __init__(self, dim=24):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(x + self.attn(self.norm(x)))


class BertSelfAttention(nn.Module):
    """Hugging Face BERT's layout: query/key/value here, the output projection in the sibling ``output.dense``."""

    def __init__(self, hidden=16, heads=4):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.all_head_size = heads * self.attention_head_size
        self.query, self.key, self.value = (nn.Linear(hidden, self.all_head_size) for _ in range(3))

    def forward(self, hidden_states, attention_mask=None):
        b, n, _ = hidden_states.shape
        q, k, v = (layer(hidden_states).view(b, n, self.num_attention_heads, self.attention_head_size)
                   .transpose(1, 2) for layer in (self.query, self.key, self.value))
        return _attend(q, k, v, attention_mask).transpose(1, 2).reshape(b, n, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, context, residual):
        return self.LayerNorm(self.dense(context) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.self = BertSelfAttention(hidden)
        self.output = BertSelfOutput(hidden)

    def forward(self, hidden_states, attention_mask=None):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class TinyBert(nn.Module):
    """Keyword inputs (``input_ids``, ``attention_mask``) and a dict output, as Hugging Face encoders."""

    def __init__(self, vocab=30, hidden=16, layers=2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.layer = nn.ModuleList(BertAttention(hidden) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask):
        h = self.embeddings(input_ids)
        additive = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        for block in self.layer:
            h = block(h, additive)
        return {"last_hidden_state": h, "pooler_output": torch.tanh(self.pooler(h[:, 0]))}


class GroupedQueryAttention(nn.Module):
    """Llama's layout: q_proj/k_proj/v_proj/o_proj, two query heads per key/value head."""

    def __init__(self, dim=32, num_heads=8, num_key_value_heads=4):
        super().__init__()
        self.num_heads, self.num_key_value_heads = num_heads, num_key_value_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k, v = (t(x).view(b, n, -1, self.head_dim).transpose(1, 2) for t in (self.k_proj, self.v_proj))
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        return self.o_proj(_attend(q, k, v).transpose(1, 2).reshape(b, n, -1))


class GQABlock(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.self_attn = GroupedQueryAttention(dim)
        self.lm_head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.lm_head(x + self.self_attn(x))


class OddAttention(nn.Module):
    """Names no convention knows (``wq``/``wk``/``wv``/``wo``, ``nh``): the user describes it."""

    def __init__(self, dim=12, nh=3):
        super().__init__()
        self.nh = nh
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.nh, -1).transpose(1, 2) for t in (self.wq, self.wk, self.wv))
        return self.wo(_attend(q, k, v).transpose(1, 2).reshape(b, n, -1))


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = OddAttention()
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        return self.out(x + self.mix(x))


def _tokens(gen):
    ids = torch.randint(0, 30, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


FORMS = {  # name -> (model factory, example inputs, attention module, head-count attribute, heads)
    "zoo-vit": (lambda: create_model("vit_tiny", num_classes=10, in_channels=1, input_size=8),
                lambda g: torch.randn(2, 1, 8, 8, generator=g), "blocks.1.attn", "heads", 4),
    "timm-fused-qkv": (TimmBlock, lambda g: torch.randn(2, 5, 24, generator=g), "attn", "num_heads", 6),
    "hf-bert": (TinyBert, _tokens, "layer.0.self", "num_attention_heads", 4),
    "grouped-query": (GQABlock, lambda g: torch.randn(2, 5, 32, generator=g), "self_attn", "num_key_value_heads",
                      4),
    "torch-mha": (AttentionBlock, lambda g: torch.randn(2, 3, 8, 8, generator=g), "attn",
                  "num_heads", 2),
}


def _masked_reference(model, graph, plan, x):
    masked = copy.deepcopy(model)
    with torch.no_grad():
        ChannelGraph._apply_masks_by_name(masked, graph.masks(plan))
        return call_model(masked, x)


def _built(form: str):
    """(model in eval mode, its example inputs, its channel graph) of one attention form, seeded."""
    make, inputs, *_ = FORMS[form]
    torch.manual_seed(0)
    model = make().eval()
    x = inputs(torch.Generator().manual_seed(1))
    return model, x, ChannelGraph(model, x)


@pytest.mark.parametrize("form", list(FORMS))
def test_whole_heads_shrink_exactly_and_the_module_still_runs(form):
    make, inputs, module, attr, units = FORMS[form]
    model, x, graph = _built(form)
    group = graph.by_root[module]
    assert group.heads is not None and len(group.units) == units
    spec = group.heads
    assert not {spec.q, spec.k, spec.v} & set(graph.skipped)  # q/k/v no longer skipped
    plan = random_plan(graph, seed=4, fraction=0.5)
    reference = _masked_reference(model, graph, plan, x)
    before = getattr(dict(model.named_modules())[module], attr)
    graph.shrink_(plan)  # checks every output against masking, 1e-5
    with torch.no_grad():
        diff, _ = output_difference(call_model(model, x), reference)
    assert diff < 1e-5
    after = getattr(dict(model.named_modules())[module], attr)
    assert after == before - len(plan.removed[module]) // (group.size // units)
    with torch.no_grad():  # another batch size and sequence length: nothing in the module is stale
        bigger = inputs(torch.Generator().manual_seed(2))
        call_model(model, bigger)
    assert find_attention(model)[0].num_heads < find_attention(make())[0].num_heads


def test_grouped_query_attention_removes_a_key_value_head_with_its_query_heads():
    model = GQABlock().eval()
    x = torch.randn(2, 5, 32)
    graph = ChannelGraph(model, x)
    group = graph.by_root["self_attn"]
    assert [len(u) for u in group.units] == [8] * 4  # 2 query heads of 4 per key/value head
    graph.shrink_(ChannelPlan({"self_attn": group.units[1]}))
    attn = model.self_attn
    assert (attn.num_heads, attn.num_key_value_heads) == (6, 3)
    assert attn.q_proj.out_features == 24 and attn.k_proj.out_features == 12 and attn.o_proj.in_features == 24


def test_a_plan_removing_part_of_a_head_is_refused():
    model = TimmBlock().eval()
    graph = ChannelGraph(model, torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="only part of a head of 'attn'"):
        graph.masks(ChannelPlan({"attn": (0, 1)}))


def test_attention_the_conventions_miss_is_pruned_once_the_user_names_it():
    model = OddBlock().eval()
    x = torch.randn(2, 5, 12)
    assert "mix" not in ChannelGraph(model, x).by_root
    unnamed = AttentionSpec("mix", "mix.wq", "mix.wk", "mix.wv", "mix.wo", num_heads=3, head_dim=4)
    graph = ChannelGraph(model, x, attention=[unnamed])  # nh would keep counting 3 heads: the probe refuses
    assert "mix" not in graph.by_root and "breaks the forward pass" in graph.skipped["mix"]
    spec = AttentionSpec("mix", "mix.wq", "mix.wk", "mix.wv", "mix.wo", num_heads=3, head_dim=4,
                         head_count_attrs=("nh",))
    graph = ChannelGraph(model, x, attention=[spec])
    assert len(graph.by_root["mix"].units) == 3
    plan = ChannelPlan({"mix": graph.by_root["mix"].units[2]})
    reference = _masked_reference(model, graph, plan, x)
    graph.shrink_(plan)
    assert model.mix.nh == 2 and model.mix.wo.in_features == 8
    with torch.no_grad():
        assert output_difference(model(x), reference)[0] < 1e-5
    assert AttentionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kwargs, message", [
    ({"num_heads": 0}, "num_heads must be a positive int"),
    ({"num_kv_heads": 2}, "num_kv_heads must divide num_heads=3"),
    ({"k": "mix.wq"}, "q, k and v must be three layers or one fused layer"),
])
def test_bad_attention_specs_are_refused(kwargs, message):
    fields = {"module": "mix", "q": "mix.wq", "k": "mix.wk", "v": "mix.wv", "out": "mix.wo", "num_heads": 3,
              "head_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        AttentionSpec(**fields)


@pytest.mark.parametrize("kwargs, message", [
    ({"head_dim": 5}, r"widths .* do not match 3 heads of 5"),
    ({"out": "mix.nothing"}, "out='mix.nothing' is not a module"),
])
def test_attention_specs_that_do_not_fit_the_model_are_refused(kwargs, message):
    fields = {"module": "mix", "q": "mix.wq", "k": "mix.wk", "v": "mix.wv", "out": "mix.wo", "num_heads": 3,
              "head_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        ChannelGraph(OddBlock().eval(), torch.randn(2, 5, 12), attention=[AttentionSpec(**fields)])
    with pytest.raises(ValueError, match="unknown AttentionSpec fields"):
        AttentionSpec.from_dict({**fields, "heads": 3})


def test_an_ignored_attention_block_keeps_its_heads():
    model = TimmBlock().eval()
    graph = ChannelGraph(model, torch.randn(2, 5, 24), ignore=["attn.qkv"])
    assert "attn" not in graph.by_root


def test_multihead_attention_becomes_its_exact_prunable_form_when_heads_go():
    model = AttentionBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(model, x)
    assert isinstance(model.attn, nn.MultiheadAttention)  # building a graph changes nothing
    graph.shrink_(ChannelPlan({"attn": graph.by_root["attn"].units[0]}))
    assert isinstance(model.attn, PrunableMultiheadAttention)
    assert (model.attn.num_heads, model.attn.source_heads, model.attn.q_proj.out_features) == (1, (1,), 4)
    assert model.attn.out_proj.out_features == 8  # the embedding (residual) width stays


@pytest.mark.parametrize("batch_first", [True, False])
def test_prunable_multihead_attention_equals_torch_with_every_mask(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    ours = PrunableMultiheadAttention.from_torch(mha)
    q, kv = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    per_head = torch.randn(2 * 3, 5, 7)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": per_head}, {"average_attn_weights": False},
                   {"attn_mask": torch.ones(5, 7, dtype=torch.bool).triu(3)}):
        with torch.no_grad():
            want, want_w = mha(q, kv, kv, **kwargs)
            got, got_w = ours(q, kv, kv, **kwargs)
        assert torch.allclose(got, want, atol=1e-6), kwargs
        assert torch.allclose(got_w, want_w, atol=1e-6), kwargs
    with torch.no_grad():
        want = mha(q[0] if batch_first else q[:, 0], kv[0] if batch_first else kv[:, 0], kv[0] if batch_first
                   else kv[:, 0], need_weights=False)[0]
        got = ours(q[0] if batch_first else q[:, 0], kv[0] if batch_first else kv[:, 0], kv[0] if batch_first
                   else kv[:, 0], need_weights=False)[0]
    assert torch.allclose(got, want, atol=1e-6)  # unbatched inputs
    with pytest.raises(ValueError, match="is_causal is a hint"):
        ours(q, kv, kv, is_causal=True)


def test_multihead_attention_with_extra_key_bias_is_left_dense():
    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn"):
        PrunableMultiheadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    assert "attn" not in ChannelGraph(Block().eval(), torch.randn(2, 4, 8)).by_root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l1", "taylor", "kron-obs", "eigendamage"])
def test_every_criterion_family_prunes_a_vit_to_its_target(method):
    import prunekit

    data = prunekit.load_dataset("synthetic")
    torch.manual_seed(0)
    vit = create_model("vit_tiny", num_classes=data.num_classes, in_channels=data.in_channels,
                       input_size=data.input_size)
    dense = prunekit.count_params(vit)
    config = prunekit.get_method(method).config(target="params=0.7")
    prunekit.prune_(vit, config, data, prunekit.RunContext(progress=False, log=lambda *_: None))
    assert prunekit.count_params(vit) / dense == pytest.approx(0.7, abs=0.02)
    if method == "l1":  # heads compete with MLP neurons in one global ranking; magnitude takes some of both
        assert sum(block.attn.heads for block in vit.blocks) < 16
    with torch.no_grad():
        out = vit.eval()(torch.randn(3, data.in_channels, data.input_size, data.input_size))
    assert out.shape == (3, data.num_classes)


# ------------------------------------------------------------------------------ the residual stream (opt-in)


def test_the_residual_stream_is_offered_only_when_asked_and_is_marked_inexact():
    vit = create_model("vit_tiny", num_classes=10, in_channels=1, input_size=8).eval()
    x = torch.randn(2, 1, 8, 8)
    assert all(g.exact for g in ChannelGraph(vit, x).groups)
    graph = ChannelGraph(vit, x, residual=True)
    stream = [g for g in graph.groups if not g.exact]
    assert len(stream) == 1 and stream[0].size == 64
    assert any(isinstance(m.module, nn.LayerNorm) for m in stream[0].members)
    plan = ChannelPlan({stream[0].root: tuple(range(16)), "blocks.0.fc1": (0, 1)})
    graph.shrink_(plan)  # the exact part is still checked against masking; the stream's change is measured
    assert graph.output_change["max_abs"] > 0 and 0 < graph.output_change["relative"] < 10
    assert vit.norm.normalized_shape == (48,) and vit.head.in_features == 48 and vit.blocks[0].fc1.out_features == 126
    assert vit(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.slow
def test_residual_pruning_reports_the_output_change_and_reloads(tmp_path):
    import prunekit
    from prunekit.persistence.architecture import load_compressed, save_compressed

    data = prunekit.load_dataset("synthetic")
    torch.manual_seed(0)
    spec = prunekit.ModelConfig(name="vit_tiny", num_classes=data.num_classes, in_channels=data.in_channels,
                                input_size=data.input_size)
    vit = prunekit.create_model(spec)
    record = prunekit.prune_(vit, prunekit.L1Config(target="params=0.6", residual=True), data,
                             prunekit.RunContext(progress=False, log=lambda *_: None))
    assert record.changes[0]["residual"] is True
    assert record.rounds[0]["output_change"]["relative"] > 0
    assert vit.norm.normalized_shape[0] < 64
    path = save_compressed(tmp_path / "vit.safetensors", vit, spec.to_dict(), record.changes)
    loaded, _ = load_compressed(path)
    x = torch.randn(2, data.in_channels, data.input_size, data.input_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), vit.eval()(x))


@pytest.mark.parametrize("form", ["zoo-vit", "timm-fused-qkv", "grouped-query", "torch-mha"])
def test_the_cost_model_predicts_the_flops_and_params_of_removing_heads(form):
    from prunekit.measurement.metrics import count_flops, count_params
    from prunekit.planning.allocation import CostModel, TargetMetric

    module = FORMS[form][2]
    model, x, graph = _built(form)
    cost = CostModel(model, graph)
    plan = ChannelPlan({module: graph.by_root[module].units[-1]})
    predicted = {m: cost.cost(plan, m) for m in (TargetMetric.FLOPS, TargetMetric.PARAMS)}
    graph.shrink_(plan)
    assert predicted[TargetMetric.FLOPS] * cost.dense_flops == pytest.approx(count_flops(model, x), rel=1e-9)
    assert predicted[TargetMetric.PARAMS] * cost.dense_params == pytest.approx(count_params(model), rel=1e-9)


def test_a_torch_transformer_encoder_loses_heads_with_a_padding_mask():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.fc = nn.Linear(16, 3)

        def forward(self, x, padding):
            return self.fc(self.enc(x, src_key_padding_mask=padding).mean(1))

    model = Encoder().eval()
    x, padding = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    graph = ChannelGraph(model, (x, padding))
    roots = [g.root for g in graph.groups if g.heads is not None]
    assert roots == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"], graph.skipped
    plan = ChannelPlan({r: graph.by_root[r].units[0] for r in roots})
    reference = _masked_reference(model, graph, plan, (x, padding))
    graph.shrink_(plan)  # the layer's fused fast path is not taken for the prunable form
    assert isinstance(model.enc.layers[0].self_attn, PrunableMultiheadAttention)
    with torch.no_grad():
        assert output_difference(model(x, padding), reference)[0] < 1e-5
