"""What a unified model is built from, and its directory format.

`ModelAssets` gathers the text tokenizer, the visual tokenizer's codebook geometry and (for the
bpe interface) the visual BPE, and derives the `Vocabulary`. `save_model` / `load_model` write
and read a directory that `transformers` understands:

    config.json, model.safetensors   the extended LM (`AutoModelForCausalLM.from_pretrained`
                                     loads it as is for the bpe interface without MoT)
    tessera_model.safetensors        instead of model.safetensors when MoT experts or rvq heads
                                     exist (Tessera's loader; plain transformers cannot run them)
    tessera.json                     vocabulary layout, model config, and the identity (path +
                                     hash) of the visual tokenizer, text tokenizer and BPE
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from tessera import storage
from tessera.config import ModelConfig, config_from_dict
from tessera.model.unified import TesseraModel
from tessera.model.vocab import Vocabulary

FORMAT = "tessera-model/1"


@dataclass
class ModelAssets:
    text_tokenizer: object
    text_identity: dict
    tokenizer_identity: dict
    codebook_sizes: dict
    """codebook name -> size, from the visual tokenizer's config."""
    depths: dict
    """codebook name -> RVQ depth."""
    bpe: object | None
    bpe_identity: dict | None
    feature_dim: int = 0
    """Width of the tokenizer's pre-quantisation features (0: none)."""

    def vocabulary(self, cfg: ModelConfig, text_size: int | None = None) -> Vocabulary:
        tok = self.text_tokenizer
        return Vocabulary(
            text_size=text_size or len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
            interface=cfg.interface, visual_size=self.visual_size(cfg),
            max_grid=cfg.max_grid, time_tokens=cfg.time_tokens, time_step=cfg.time_step)

    def visual_size(self, cfg: ModelConfig) -> int:
        """Output rows for visual tokens: the BPE's vocabulary (bpe), the pixel codebook (continuous:
        its codes are the targets), none (rvq: its depth heads predict the codes)."""
        if cfg.interface == "bpe":
            return self.bpe.vocab_size
        return self.codebook_sizes.get("pixel", 0) if cfg.interface == "continuous" else 0

    def tile_codes(self, cfg: ModelConfig) -> torch.Tensor | None:
        """The table of each BPE token's base codes that the grid encoder and `extent` positions read
        (None when the model has neither)."""
        if not cfg.grid_encoder.layers and cfg.visual_positions != "extent":
            return None
        from tessera.model.grid_encoder import GridEncoder

        return GridEncoder.tiles_from_bpe(self.bpe, self.visual_size(cfg))

    def rvq_geometry(self, cfg: ModelConfig) -> tuple[list[int], int]:
        """(codebook sizes, depth) of the rvq interface; ([], feature width) for the continuous one."""
        if cfg.interface == "continuous":
            if not self.feature_dim:
                raise ValueError("model.interface continuous: the visual tokenizer has no pre-quantisation features "
                                 "(only the vq preset)")
            return [], self.feature_dim
        if cfg.interface != "rvq":
            return [], 1
        missing = [c for c in cfg.codebooks if c not in self.codebook_sizes]
        if missing:
            raise ValueError(f"model.codebooks {missing} are not produced by the visual tokenizer "
                             f"(it has {sorted(self.codebook_sizes)})")
        return [self.codebook_sizes[c] for c in cfg.codebooks], min(self.depths[c] for c in cfg.codebooks)


def load_assets(cfg: ModelConfig, resolve=lambda s: s) -> ModelAssets:
    from tessera.bpe.model import VisualBPE
    from tessera.tokenize.text import load_text_tokenizer, text_tokenizer_identity
    from tessera.tokenize.tokenizer import codebooks, feature_dim, read_config, tokenizer_identity

    tok_dir = resolve(cfg.tokenizer)
    tok_cfg = read_config(tok_dir)[0]
    geometry = codebooks(tok_cfg)
    sizes, depths = {k: v[0] for k, v in geometry.items()}, {k: v[1] for k, v in geometry.items()}
    text_path = resolve(cfg.text_tokenizer)
    bpe, bpe_id = None, None
    if cfg.interface == "bpe":
        path = resolve(cfg.bpe)
        bpe = VisualBPE.load(path)
        bpe_id = {"path": os.path.abspath(path), "hash": bpe.hash}
    return ModelAssets(load_text_tokenizer(text_path), text_tokenizer_identity(text_path), tokenizer_identity(tok_dir),
                       sizes, depths, bpe, bpe_id, feature_dim(tok_cfg))


def save_model(model: TesseraModel, directory: str, identities: dict | None = None, extra: dict | None = None) -> str:
    """Write the model directory (atomic per file; on an object store, written locally then uploaded).
    Returns the location of tessera.json."""
    with storage.local_dir(directory, write=True) as local:
        _save_model(model, local, identities, extra)
    return storage.join(directory, "tessera.json")


def _save_model(model: TesseraModel, directory: str, identities: dict | None, extra: dict | None) -> None:
    from safetensors.torch import save_file

    plain = (model.vocab.interface == "bpe" and not model.cfg.mot and model.cfg.visual_positions == "1d"
             and not model.cfg.grid_encoder.layers and not model.cfg.next_cell)
    state = {k: v.detach().cpu().contiguous() for k, v in (model.lm.state_dict() if plain else model.state_dict()).items()}
    if plain:
        model.lm.save_pretrained(directory, safe_serialization=True)
        stale = os.path.join(directory, "tessera_model.safetensors")
    else:
        model.lm.config.save_pretrained(directory)
        save_file(state, os.path.join(directory, "tessera_model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(directory, "tessera_model.safetensors.tmp"), os.path.join(directory, "tessera_model.safetensors"))
        stale = os.path.join(directory, "model.safetensors")
    if os.path.exists(stale):
        os.remove(stale)
    info = {
        "format": FORMAT, "weights": "transformers" if plain else "tessera",
        "vocabulary": model.vocab.to_dict(), "new_token_names": model.vocab.token_names(),
        "model": dataclasses.asdict(model.cfg), "codebook_sizes": model.codebook_sizes, "depth": model.depth,
        **(identities or {}), **(extra or {}),
    }
    path = os.path.join(directory, "tessera.json")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def read_info(directory: str) -> dict:
    info = storage.read_json(storage.join(directory, "tessera.json"))
    if info.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a Tessera model (format {info.get('format')!r}, expected {FORMAT!r})")
    return info


def load_model(directory: str, device: str | torch.device = "cpu") -> TesseraModel:
    """A saved model from a local directory or any `pyarrow.fs` URI (copied locally first)."""
    with storage.local_dir(directory) as local:
        return _load_model(local, device)


def _load_model(directory: str, device: str | torch.device) -> TesseraModel:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    info = read_info(directory)
    cfg = config_from_dict({"model": info["model"]}).model
    vocab = Vocabulary.from_dict(info["vocabulary"])
    if info["weights"] == "transformers":
        lm = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)
        model = TesseraModel(lm, vocab, cfg, info["codebook_sizes"], info["depth"])
    else:
        config = AutoConfig.from_pretrained(directory)
        config._attn_implementation = "sdpa"
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        state = load_file(os.path.join(directory, "tessera_model.safetensors"))
        model = TesseraModel(lm, vocab, cfg, info["codebook_sizes"], info["depth"], state.get("grid_encoder.tile_codes"),
                             state.get("tile_shapes"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(f"{directory}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
