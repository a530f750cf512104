"""`TesseraModel`: a Hugging Face causal LM with an extended vocabulary and a visual interface.

    lm            Qwen2ForCausalLM (tiny from config, or `from_pretrained`), vocabulary extended
                  by `Vocabulary.num_new` rows; the text rows stay bit-identical
    (mot)         every decoder layer is a `MoTDecoderLayer` with visual experts; the visual
                  positions' mask goes to the layers as the `visual_mask` keyword
    code_embed    rvq interface: codes (N, C, D) -> input embedding (N, hidden)
    depth_heads   rvq interface: one DepthHead per codebook
    feature_proj  continuous interface: `FeatureProjector`, Linear -> GELU -> Linear (LLaVA's
                  projector) -> RMS-normalised to the text embeddings' scale, the encoder's
                  feature (N, dim) -> input embedding (N, hidden)

    grid_rows,    visual_positions `2d`: learned embeddings of a visual token's anchor row and
    grid_cols     column, added to its input embedding; `extent`: their means over the rows and
                  the columns its BPE tile covers (`tile_shapes` (V, 2): each tile's height, width)
    next_rows,    `next_cell`: learned embeddings of the row and column where the *next* visual
    next_cols     token will be anchored, added to the input embedding of the position that predicts it
    grid_encoder  bpe interface with `grid_encoder.layers > 0`: a CNN over the base-code grid of each
                  image the model reads, added to its tiles' input embeddings (`GridEncoder`)

Inputs are packed rows (see `tessera.model.packing`): `input_ids`, `position_ids`, `doc_ids`
and `turn_ids` (B, L), `cells` (B, L, 2); `codes` (B, L, C, D) at `<|cell|>` positions for the
rvq interface, (B, L, 1, dim) feature bits at the code tokens for the continuous one (see `features_from_bits`). A
4-D boolean mask built from `doc_ids` and `turn_ids` keeps attention inside each document and
each independent turn (plus its shared prefix).

`forward(..., labels=None)` follows `transformers`' causal-LM contract: it returns a
`CausalLMOutputWithPast` (here `TesseraOutput`, which adds the text / image split of the loss
and the target counts for logging) whose `loss` is set when `labels` (B, L) are given (-100 = no
loss). `labels` are already shifted: `labels[t]` is the token predicted from position t (the
packer aligns them), unlike `Qwen2ForCausalLM`, which shifts inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import ModelConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from tessera.model.grid_encoder import GridEncoder
from tessera.model.mot import CACHE_ARG, apply_mot
from tessera.model.rvq_heads import CodeEmbedding, DepthHead, depth_loss
from tessera.model.vocab import Vocabulary

IGNORE = -100


@dataclass
class TesseraOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` (loss, logits (B, L, V), the KV cache: `past_key_values`, or `cache` from
    transformers 5.24 on, see `mot.CACHE_ARG`) plus what training logs:
    the loss over text targets and over image targets, the number of targets (all on device,
    detached), and the final hidden states (B, L, H) that the rvq depth heads read.
    `text_loss_sum` / `image_loss_sum` are the summed losses of each modality's targets *with* their
    graph, for a trainer that weighs the two means itself (`train.stages[].image_loss_weight`)."""

    last_hidden_state: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    num_targets: torch.LongTensor | None = None
    num_text_targets: torch.LongTensor | None = None
    text_loss_sum: torch.FloatTensor | None = None
    image_loss_sum: torch.FloatTensor | None = None


def build_base_lm(cfg: ModelConfig, text_size: int, seed: int = 0):
    """The base causal LM: `from_pretrained(cfg.pretrained)`, or a tiny Qwen2 from the config fields."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation="sdpa", dtype=torch.float32)
    config = Qwen2Config(
        vocab_size=text_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def extend_vocabulary(lm, new_size: int, init: str, noise: float, seed: int = 0) -> int:
    """Grow input and output embeddings to `new_size` rows. Old rows are copied bit-exactly; new
    rows are `mean` of the old rows plus N(0, noise) or `he` (N(0, 2/hidden)), drawn on the CPU from
    `seed` whatever device the model is on (the same rows on a GPU). Returns the old size."""
    emb = lm.get_input_embeddings()
    old = emb.weight.shape[0]
    if new_size <= old:
        raise ValueError(f"extended vocabulary ({new_size}) must be larger than the base model's ({old})")
    gen = torch.Generator().manual_seed(seed)

    def grow(weight: torch.Tensor) -> torch.Tensor:
        n, d = new_size - old, weight.shape[1]
        if init == "mean":
            rows = weight.detach().float().mean(0, keepdim=True).cpu() + noise * torch.randn(n, d, generator=gen)
        else:
            rows = torch.randn(n, d, generator=gen) * math.sqrt(2.0 / d)
        return torch.cat([weight.detach(), rows.to(weight.device, weight.dtype)], dim=0)

    tied = lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is emb.weight
    new_in = nn.Embedding(new_size, emb.weight.shape[1], dtype=emb.weight.dtype, device=emb.weight.device)
    new_in.weight.data.copy_(grow(emb.weight))
    lm.set_input_embeddings(new_in)
    out = lm.get_output_embeddings()
    if tied:
        out.weight = new_in.weight
    else:
        new_out = nn.Linear(out.in_features, new_size, bias=out.bias is not None, dtype=out.weight.dtype,
                            device=out.weight.device)
        new_out.weight.data.copy_(grow(out.weight))
        if out.bias is not None:
            new_out.bias.data.copy_(torch.cat([out.bias.detach(), out.bias.detach().new_zeros(new_size - old)]))
        lm.set_output_embeddings(new_out)
    lm.config.vocab_size = new_size
    return old


def features_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., dim) int64 float32 bit patterns (`sequence.feature_bits`) -> (..., dim) float32."""
    signed = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    return signed.view(torch.float32)


def packed_attention_mask(doc_ids: torch.Tensor, turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """doc_ids, turn_ids (B, L) -> (B, 1, L, L) bool, True where query i may attend key j: same
    document, j <= i, and key j in the shared prefix (turn 0) or in i's own turn."""
    L = doc_ids.shape[1]
    allowed = doc_ids[:, :, None] == doc_ids[:, None, :]
    allowed &= torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    if turn_ids is not None:
        allowed &= (turn_ids[:, None, :] == 0) | (turn_ids[:, :, None] == turn_ids[:, None, :])
    return allowed.unsqueeze(1)


class FeatureProjector(nn.Module):
    """The continuous interface's cell embedding: an encoder feature (N, dim) -> (N, hidden).

    LLaVA's two-layer MLP (no input normalisation: the VQ's nearest-code search reads the feature's
    norm too), its output RMS-normalised and scaled to `rms`, the text embeddings' RMS: a cell has a
    token's scale whatever the weights learn, so the row/column embeddings added to it stay
    visible (unbounded, LayerNorm -> MLP, it grew to 160x that scale in the embeddings-only stage).
    Measured (README "Ablations"): bounding the scale did not make the model read the image, with or
    without the codes as targets; the continuous arm stays at chance at the demo's budget."""

    def __init__(self, dim: int, hidden: int, rms: float, std: float = 0.02):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        self.register_buffer("rms", torch.tensor(float(rms)))  # saved with the weights: the model loads as trained
        for layer in (self.fc1, self.fc2):  # as transformers initialises the LM's own Linear layers
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act(self.fc1(features)))
        # eps far below the MLP's output at init (~1e-5 mean square with std-0.02 weights): a larger
        # one would shrink the cells instead of normalising them
        return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-12).to(x.dtype) * self.rms.to(x.dtype)


def tile_shapes_of(tile_codes: torch.Tensor) -> torch.Tensor:
    """(V, T, T) base codes of each BPE token's tile, -1 outside it -> (V, 2) int64 (height, width)."""
    inside = tile_codes >= 0
    return torch.stack([inside.any(2).sum(1), inside.any(1).sum(1)], dim=1).to(torch.int64)


def next_anchor_cells(cells: torch.Tensor) -> torch.Tensor:
    """(B, L, 2) anchor cells (-1 = not visual) -> (B, L, 2): position t gets token t+1's anchor, -1 where
    token t+1 is not visual or t is the last position. Token t+1's anchor is the first free cell after
    the tiles up to t, so feeding it to position t leaks nothing about token t+1 itself."""
    return torch.cat([cells[:, 1:], torch.full_like(cells[:, :1], -1)], dim=1)


class TesseraModel(nn.Module):
    def __init__(self, lm, vocab: Vocabulary, cfg: ModelConfig, codebook_sizes: list[int] | None = None, depth: int = 1,
                 tile_codes: torch.Tensor | None = None, tile_shapes: torch.Tensor | None = None):
        """`depth`: the rvq interface's code depth D; the continuous interface's feature width.
        `tile_codes` (V, T, T): each BPE token's base codes (`GridEncoder.tiles_from_bpe`), needed with
        `cfg.grid_encoder.layers > 0` and, unless `tile_shapes` (V, 2) is given, with `visual_positions: extent`."""
        super().__init__()
        self.lm, self.vocab, self.cfg = lm, vocab, cfg
        self.codebook_sizes = list(codebook_sizes or [])
        self.depth = depth
        self.code_slots = vocab.code_slots(len(self.codebook_sizes))
        """C of the (B, L, C, D) `codes` input (0: the interface takes none)."""
        if vocab.interface == "continuous":
            text_rows = lm.get_input_embeddings().weight[:vocab.text_size]
            self.feature_proj = FeatureProjector(depth, lm.config.hidden_size, float(text_rows.detach().float().pow(2).mean().sqrt()),
                                                 getattr(lm.config, "initializer_range", 0.02))
        if vocab.interface == "rvq":
            if not self.codebook_sizes:
                raise ValueError("the rvq interface needs the tokenizer's codebook sizes")
            hidden, dh = lm.config.hidden_size, cfg.depth_head
            self.code_embed = CodeEmbedding(self.codebook_sizes, depth, dh.dim, hidden)
            self.depth_heads = nn.ModuleList(DepthHead(hidden, k, depth, dh.dim, dh.layers, dh.heads) for k in self.codebook_sizes)
        if cfg.visual_positions in ("2d", "extent"):
            self.grid_rows, self.grid_cols = self._row_column_tables()
        if cfg.next_cell:
            self.next_rows, self.next_cols = self._row_column_tables()
        if cfg.visual_positions == "extent":
            if vocab.interface != "bpe" or (tile_codes is None and tile_shapes is None):
                raise ValueError("visual_positions extent needs the bpe interface and its tiles' codes (tile_codes)")
            # a buffer: saved with the weights, so a loaded model needs no BPE
            self.register_buffer("tile_shapes", (tile_shapes if tile_shapes is not None else tile_shapes_of(tile_codes)).to(torch.int64))
        if cfg.grid_encoder.layers:
            self.attach_grid_encoder(tile_codes)
        if cfg.mot:  # last: building the experts draws random numbers, which must not change the parts above
            apply_mot(lm, attention=cfg.mot_attention)

    # ------------------------------------------------------------------ construction

    def _row_column_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        """Learned row and column embeddings of a grid cell, (max_grid, hidden) each, std 0.02."""
        tables = tuple(nn.Embedding(self.cfg.max_grid, self.lm.config.hidden_size) for _ in range(2))
        for emb in tables:
            nn.init.normal_(emb.weight, std=0.02)
        return tables

    def attach_grid_encoder(self, tile_codes: torch.Tensor | None) -> None:
        """A `GridEncoder` as `self.cfg.grid_encoder` sizes it, over the BPE tiles' codes (V, T, T)."""
        if self.vocab.interface != "bpe" or tile_codes is None:
            raise ValueError("the grid encoder needs the bpe interface and its tiles' codes (tile_codes)")
        g = self.cfg.grid_encoder
        self.grid_encoder = GridEncoder(tile_codes, self.lm.config.hidden_size, g.dim, g.layers, g.kernel)

    @classmethod
    def create(cls, cfg: ModelConfig, vocab: Vocabulary, codebook_sizes: list[int] | None = None, depth: int = 1,
               seed: int = 0, tile_codes: torch.Tensor | None = None) -> "TesseraModel":
        """Base LM (text rows only) -> extended vocabulary -> visual interface (and MoT experts)."""
        lm = build_base_lm(cfg, vocab.text_size, seed)
        if lm.get_input_embeddings().weight.shape[0] != vocab.text_size:
            raise ValueError(f"the base model has {lm.get_input_embeddings().weight.shape[0]} embedding rows but the "
                             f"vocabulary expects {vocab.text_size} text ids; build the Vocabulary from the model")
        extend_vocabulary(lm, vocab.size, cfg.init, cfg.init_noise, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            return cls(lm, vocab, cfg, codebook_sizes, depth, tile_codes)

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, codes: torch.Tensor | None, cells: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, next_cells: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids [+ (B, L, C, D) codes] [+ (B, L, 2) anchor cells, -1 = none] [+ (B, L) labels: which
        images are targets, for the grid encoder] [+ (B, L, 2) the next token's anchor cell, -1 = none;
        by default `next_anchor_cells(cells)`] -> (B, L, hidden).
        Rows are checked where they are built (`SequenceBuilder` names the sample); here an asynchronous
        device assertion guards the embedding lookup without making the host wait for the device."""
        in_vocabulary = ((input_ids >= 0) & (input_ids < self.vocab.size)).all()
        torch._assert_async(in_vocabulary, f"a token id outside the vocabulary of {self.vocab.size} ids")
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.vocab.interface == "rvq" and codes is not None:
            at_cell = (input_ids == self.vocab.cell).unsqueeze(-1)
            cell_embeds = self.code_embed(codes.clamp(min=0).flatten(0, 1)).view_as(embeds)  # every position: no indexing
            embeds = torch.where(at_cell, cell_embeds.to(embeds.dtype), embeds)
        if self.vocab.interface == "continuous" and codes is not None:  # a code token's input is its cell's feature
            at_code = (input_ids >= self.vocab.visual_base).unsqueeze(-1)
            feats = torch.where(at_code, features_from_bits(codes[..., 0, :]), 0.0)  # no NaN bits off the codes
            embeds = torch.where(at_code, self.feature_proj(feats).to(embeds.dtype), embeds)
        if cells is not None and hasattr(self, "grid_rows"):
            extent = (lambda rc: self.extent_embedding(input_ids, rc)) if hasattr(self, "tile_shapes") else None
            embeds = embeds + self._cell_embedding(cells, self.grid_rows, self.grid_cols, extent).to(embeds.dtype)
        if hasattr(self, "next_rows") and (next_cells is not None or cells is not None):
            nxt = next_anchor_cells(cells) if next_cells is None else next_cells
            embeds = embeds + self._cell_embedding(nxt, self.next_rows, self.next_cols).to(embeds.dtype)
        if cells is not None and hasattr(self, "grid_encoder"):
            embeds = self._add_grid_features(embeds, input_ids, cells, labels)
        return embeds

    def _cell_embedding(self, cells: torch.Tensor, rows: nn.Embedding, cols: nn.Embedding, place=None) -> torch.Tensor:
        """(B, L, 2) cells (-1 = none) -> (B, L, hidden): row + column embedding (or `place(clamped cells)`),
        zero where there is no cell."""
        placed = (cells[..., 0] >= 0).unsqueeze(-1)
        rc = cells.clamp(min=0, max=self.cfg.max_grid - 1)
        return placed * (place(rc) if place else rows(rc[..., 0]) + cols(rc[..., 1]))

    def extent_embedding(self, input_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B, L, 2) anchor cells (>= 0) -> (B, L, hidden): the mean row embedding over the
        rows a visual token's tile covers plus the mean column embedding over its columns (a non-visual
        token counts as 1x1). Means over a span come from prefix sums of the tables, so each token costs
        two lookups whatever its tile's size."""
        v = self.vocab
        visual = (input_ids >= v.visual_base) & (input_ids < v.visual_base + v.visual_size)
        shape = self.tile_shapes[(input_ids - v.visual_base).clamp(0, v.visual_size - 1)]  # (B, L, 2)
        shape = torch.where(visual.unsqueeze(-1), shape, torch.ones_like(shape))
        end = (anchors + shape).clamp(max=self.cfg.max_grid)
        span = (end - anchors).clamp(min=1).unsqueeze(-1)  # (B, L, 2, 1)
        out = 0
        for axis, table in enumerate((self.grid_rows.weight, self.grid_cols.weight)):
            prefix = F.pad(table.cumsum(0), (0, 0, 1, 0))  # (G + 1, hidden): prefix[k] = sum of rows < k
            out = out + (prefix[end[..., axis]] - prefix[anchors[..., axis]]) / span[..., axis, :]
        return out

    def read_images(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which visual tokens belong to an image the model reads (see `tessera.model.grid_encoder`):
        (B, L) bool, and (B, L) int64 image keys (row * (L + 1) + the image's number in the row)."""
        v = self.vocab
        B, L = input_ids.shape
        visual = (input_ids >= v.visual_base) & (input_ids < v.visual_base + v.visual_size)
        number = (input_ids == v.image_start).cumsum(1)  # 1 = the row's first image
        complete = (number >= 1) & (number <= (input_ids == v.image_end).sum(1, keepdim=True))
        key = torch.arange(B, device=input_ids.device)[:, None] * (L + 1) + number
        read = visual & complete
        if labels is not None:  # labels[t] is token t+1 when it is a target
            target = torch.zeros_like(read)
            target[:, 1:] = labels[:, :-1] != IGNORE
            read &= ~torch.isin(key, key[visual & target])
        return read, key

    def _add_grid_features(self, embeds: torch.Tensor, input_ids: torch.Tensor, cells: torch.Tensor,
                           labels: torch.Tensor | None) -> torch.Tensor:
        read, key = self.read_images(input_ids, labels)
        where = read.nonzero(as_tuple=True)
        if not where[0].numel():
            return embeds
        image_of = torch.unique(key[where], return_inverse=True)[1]
        feats = self.grid_encoder(input_ids[where] - self.vocab.visual_base, image_of, cells[where])
        return embeds.index_put(where, feats.to(embeds.dtype), accumulate=True)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids >= self.vocab.visual_base) | (input_ids == self.vocab.cell)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                attention_mask: torch.Tensor | None = None, turn_ids: torch.Tensor | None = None,
                cells: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                target_codes: torch.Tensor | None = None, next_cells: torch.Tensor | None = None) -> TesseraOutput:
        """Logits (B, L, V) for packed rows; with `labels` (B, L) also the mean loss over targets
        (and for the rvq interface the depth loss of each `<|cell|>` target's `target_codes`).
        `next_cells` (B, L, 2): where each position's next visual token goes (`model.next_cell`); by
        default read off `cells`, which holds for whole rows but not for the last position of a
        chunk fed to a KV cache, which incremental decoding passes itself."""
        embeds = self.embed(input_ids, codes, cells, labels, next_cells)
        if attention_mask is None and doc_ids is not None:
            attention_mask = packed_attention_mask(doc_ids, turn_ids)
        routing = {"visual_mask": self.visual_mask(input_ids)} if self.cfg.mot else {}
        out = self.lm.model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=use_cache, **{CACHE_ARG: past_key_values}, **routing)
        hidden = out.last_hidden_state
        logits = self.lm.lm_head(hidden)
        result = TesseraOutput(logits=logits, last_hidden_state=hidden, **{CACHE_ARG: getattr(out, CACHE_ARG)})
        if labels is not None:
            self._add_loss(result, labels, target_codes)
        return result

    def target_masks(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(valid, text, image) boolean masks of `labels` (B, L): which positions are targets, and of
        those which are text tokens and which visual ones (tiles, `<|cell|>`, image markers)."""
        valid = labels != IGNORE
        is_text = valid & (labels < self.vocab.text_size)
        return valid, is_text, valid & ~is_text

    def _add_loss(self, out: TesseraOutput, labels: torch.Tensor, target_codes: torch.Tensor | None) -> None:
        """Masked sums instead of boolean indexing: no data-dependent shapes, no host sync (bpe interface)."""
        valid, is_text, is_image = self.target_masks(labels)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none").view_as(labels)
        total, text_sum, image_sum = (ce * valid).sum(), (ce * is_text).sum(), (ce * is_image).sum()
        if self.vocab.interface == "rvq":
            # the depth heads run on every position and a mask keeps the `<|cell|>` targets' losses: boolean
            # indexing would give a data-dependent shape and a host sync per step
            is_cell = (valid & (labels == self.vocab.cell)).flatten()  # (B*T,)
            h, tc = out.last_hidden_state.flatten(0, 1), target_codes.flatten(0, 1)  # (B*T, H), (B*T, C, D)
            per_cell = sum(depth_loss(head(h, tc[:, c]), tc[:, c], reduction="none").mean(1)
                           for c, head in enumerate(self.depth_heads)) / len(self.depth_heads)  # (B*T,)
            d_sum = (per_cell * is_cell).sum()
            total, image_sum = total + d_sum, image_sum + d_sum
        n, n_text = valid.sum(), is_text.sum()
        out.loss = total / n.clamp(min=1)  # one sum, not text + image: the default loss stays bit-identical
        out.text_loss_sum, out.image_loss_sum = text_sum, image_sum
        out.text_loss = (text_sum / n_text.clamp(min=1)).detach()
        out.image_loss = (image_sum / is_image.sum().clamp(min=1)).detach()
        out.num_targets, out.num_text_targets = n.detach(), n_text.detach()

    # ------------------------------------------------------------------ parameter groups

    def new_embedding_rows(self) -> slice:
        return slice(self.vocab.text_size, self.vocab.size)

    def decoder_layers(self) -> nn.ModuleList:
        return self.lm.model.layers
