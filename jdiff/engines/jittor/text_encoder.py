"""Stable Diffusion's CLIP text encoder (transformers' ``CLIPTextModel``) in Jittor, from ``<model>/text_encoder/``.

API:
    encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", allow_pickle=False)
    states = encoder(input_ids)        # (B, L) token ids -> last_hidden_state (B, L, hidden_size)

Token and position embeddings, pre-LayerNorm transformer layers with causal self-attention, a final
LayerNorm; SD 1.x's encoder uses the ``quick_gelu`` activation, SD 2.x's ``gelu`` (from ``hidden_act``).
Tokenization stays with transformers' ``CLIPTokenizer`` (plain Python).

Parameter names carry the ``text_model.`` prefix, as in SD checkpoints and jdiff's LoRA files; weights saved
without it (transformers 5 writes both spellings) get it added when they load.
"""

from __future__ import annotations

import math
from pathlib import Path

import jittor as jt
from jittor import nn

from jdiff.engines.base import EngineError
from jdiff.engines.jittor.blocks import LayerNorm, attention
from jdiff.engines.jittor.weights import build_from_folder

PREFIX = "text_model."


def quick_gelu(x: jt.Var) -> jt.Var:
    return x * jt.sigmoid(1.702 * x)


def gelu(x: jt.Var) -> jt.Var:
    return 0.5 * x * (1.0 + jt.erf(x / math.sqrt(2.0)))


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def with_prefix(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


class CLIPAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def execute(self, x: jt.Var, causal_mask: jt.Var) -> jt.Var:
        batch, tokens, hidden = x.shape

        def heads(t):
            return t.reshape(batch, tokens, self.heads, hidden // self.heads).transpose(0, 2, 1, 3)

        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), causal_mask, upcast=True)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, tokens, hidden))


class CLIPMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: dict, activation):
        super().__init__()
        hidden, eps = c["hidden_size"], c["layer_norm_eps"]
        self.layer_norm1 = LayerNorm(hidden, eps=eps)
        self.self_attn = CLIPAttention(hidden, c["num_attention_heads"])
        self.layer_norm2 = LayerNorm(hidden, eps=eps)
        self.mlp = CLIPMLP(hidden, c["intermediate_size"], activation)

    def execute(self, x: jt.Var, causal_mask: jt.Var) -> jt.Var:
        x = x + self.self_attn(self.layer_norm1(x), causal_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: dict, activation):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(c, activation) for _ in range(c["num_hidden_layers"])])


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.token_embedding = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embedding = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])

    def execute(self, input_ids: jt.Var) -> jt.Var:
        positions = jt.arange(input_ids.shape[1]).int32()
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: dict, activation):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c, activation)
        self.final_layer_norm = LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])


class CLIPTextModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **config}
        if c["hidden_act"] not in ACTIVATIONS:
            raise EngineError(f"the Jittor text encoder supports hidden_act {sorted(ACTIVATIONS)}, "
                              f"not {c['hidden_act']!r}.")
        self.config = c
        self.text_model = CLIPTextTransformer(c, ACTIVATIONS[c["hidden_act"]])

    @classmethod
    def from_pretrained(cls, folder: Path, allow_pickle: bool = False) -> "CLIPTextModel":
        return build_from_folder(cls, folder, allow_pickle, rename=with_prefix)

    def execute(self, input_ids: jt.Var) -> jt.Var:
        """The last hidden state, after the final LayerNorm."""
        model = self.text_model
        limit = self.config["max_position_embeddings"]
        if input_ids.shape[1] > limit:
            raise EngineError(f"{input_ids.shape[1]} tokens, but the text encoder takes at most {limit}.")
        x = model.embeddings(input_ids.int32())
        tokens = x.shape[1]
        # -inf above the diagonal: token i attends to tokens 0..i only
        causal_mask = jt.triu(jt.full((tokens, tokens), float("-inf"), dtype=x.dtype), diagonal=1)
        for layer in model.encoder.layers:
            x = layer(x, causal_mask)
        return model.final_layer_norm(x)
