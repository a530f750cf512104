"""Generation with a KV cache: image -> text, and text -> image with classifier-free guidance.

Text -> image only ever emits tokens that are valid next, so every generated image decodes to
a full grid: after `<|image_start|> <h=H> <w=W>`, the bpe interface allows exactly the tiles
that fit at the next free cell (`VisualBPE.start_decoding(...).valid_mask()`), and the rvq
interface emits H*W cells whose codes come from the depth heads (a code per depth).
CFG: `logits = uncond + scale * (cond - uncond)`, the unconditional branch being the same
image continuation after `<bos>` alone (what caption dropout trained), over the tokens the
conditional branch finds plausible only (`rvq_heads.guided`): unconstrained, guidance lifts the
tokens both branches rule out (a memorised caption drew 5-19 % of its own cells at scale 3, all of
them at scale 1; README "Learning").
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.model.mot import CACHE_ARG
from tessera.model.rvq_heads import guided, pick
from tessera.model.unified import TesseraModel, next_anchor_cells
from tessera.tokenize.tokenizer import tokenizer_device


class Decoder:
    """Incremental decoding of one sequence: feed tokens, read the last hidden state and logits."""

    def __init__(self, model: TesseraModel, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.device = next(model.parameters()).device
        self.ids: list[int] = []
        self.codes: list[np.ndarray] = []
        self.cells: list[np.ndarray] = []
        self.next_cells: list[np.ndarray] = []
        self.past = None
        self.n_codebooks = model.code_slots

    def _codes_tensor(self, codes: list[np.ndarray]) -> torch.Tensor | None:
        if not self.n_codebooks:
            return None
        return torch.from_numpy(np.stack(codes)).to(self.device).unsqueeze(0)

    @torch.no_grad()
    def feed(self, ids, codes: np.ndarray | None = None, cells: np.ndarray | None = None,
             next_cells: np.ndarray | None = None, all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (n,), codes (n, C, D) | None, cells (n, 2) | None (anchor cells of visual tokens, -1
        elsewhere), next_cells (n, 2) | None (the anchor of the token after each one, -1 = none; by
        default read off `cells`, so the chunk's last token gets none) -> last hidden (H,), last logits
        (V,) in float32; with `all_logits` the logits of every fed position, (n, V)."""
        ids = [int(i) for i in np.atleast_1d(ids)]
        cells = np.full((len(ids), 2), -1, np.int64) if cells is None else np.asarray(cells, np.int64).reshape(len(ids), 2)
        if next_cells is None:
            next_cells = next_anchor_cells(torch.from_numpy(cells)[None])[0].numpy()
        next_cells = np.asarray(next_cells, np.int64).reshape(len(ids), 2)
        if self.n_codebooks:
            if codes is None:
                codes = np.zeros((len(ids), self.n_codebooks, self.model.depth), np.int64)
            new_codes = [np.maximum(c, 0) for c in np.asarray(codes, np.int64)]  # -1 (none) -> 0 (continuous: +0.0)
        else:
            new_codes = [None] * len(ids)
        start = len(self.ids)
        self.ids += ids
        self.codes += new_codes
        self.cells += list(cells)
        self.next_cells += list(next_cells)
        if self.use_cache:
            run_ids, run_codes, run_cells, run_next, first = ids, new_codes, list(cells), list(next_cells), start
        else:
            run_ids, run_codes, run_cells, run_next, first, self.past = self.ids, self.codes, self.cells, self.next_cells, 0, None
        x = torch.tensor([run_ids], device=self.device)
        pos = torch.arange(first, first + len(run_ids), device=self.device).unsqueeze(0)
        cells_t = torch.from_numpy(np.stack(run_cells)).to(self.device).unsqueeze(0)
        next_t = torch.from_numpy(np.stack(run_next)).to(self.device).unsqueeze(0)
        with autocast(self.device):
            out = self.model(x, pos, codes=self._codes_tensor(run_codes), past_key_values=self.past,
                             use_cache=self.use_cache, cells=cells_t, next_cells=next_t)
        self.past = getattr(out, CACHE_ARG) if self.use_cache else None
        logits = out.logits[0, -len(ids):] if all_logits else out.logits[0, -1]
        return out.last_hidden_state[0, -1].float(), logits.float()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def generate_text(model: TesseraModel, prompt_ids, prompt_codes: np.ndarray | None = None, max_new_tokens: int = 48,
                  temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None,
                  use_cache: bool = True, prompt_cells: np.ndarray | None = None) -> list[int]:
    """Continue a prompt with text until <eos> (not included) or max_new_tokens. Only text ids are allowed."""
    vocab = model.vocab
    dec = Decoder(model, use_cache)
    _, logits = dec.feed(prompt_ids, prompt_codes, prompt_cells)
    out = []
    for _ in range(max_new_tokens):
        logits = logits.clone()
        logits[vocab.text_size:] = float("-inf")
        logits[vocab.bos_id] = logits[vocab.pad_id] = float("-inf")
        token = int(pick(logits.unsqueeze(0), temperature, top_k, generator)[0])
        if token == vocab.eos_id:
            break
        out.append(token)
        _, logits = dec.feed([token])
    return out


@torch.no_grad()
def text_log_prob(model: TesseraModel, prompt_ids, text_ids, prompt_codes: np.ndarray | None = None,
                  prompt_cells: np.ndarray | None = None) -> float:
    """log p(text_ids + <eos> | prompt), summed over the text's tokens and its <eos>: the likelihood the
    model's own forward (`labels` on those tokens) gives them. With the prompt <bos> + an image it is
    how well the model finds a caption describes that image, which ranks the candidates of
    `Evaluator.generation` (best-of-n by the model's own captioning)."""
    targets = [int(t) for t in text_ids] + [model.vocab.eos_id]
    dec = Decoder(model)
    _, first = dec.feed(prompt_ids, prompt_codes, prompt_cells)
    _, rest = dec.feed(targets[:-1], all_logits=True) if len(targets) > 1 else (None, first[:0])
    logits = torch.cat([first[None], rest.reshape(-1, first.shape[-1])])  # (len(targets), V): each predicts its target
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)].sum())


def _guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    return guided(cond, uncond, scale) if uncond is not None else cond


@torch.no_grad()
def generate_image(model: TesseraModel, prompt_ids, grid: tuple[int, int], bpe=None, cfg_scale: float = 3.0,
                   temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                   use_cache: bool = True) -> np.ndarray:
    """Text prompt (<bos> + caption ids) -> codes of a full grid: (H, W) base codes for the bpe
    interface, (H, W, C, D) for rvq. `cfg_scale` 1 turns guidance off."""
    vocab = model.vocab
    if vocab.interface == "continuous":
        raise ValueError("the continuous interface reads each code's encoder feature, which a generated code does not have")
    H, W = grid
    header = [vocab.image_start, vocab.height_token(H), vocab.width_token(W)]
    cond = Decoder(model, use_cache)
    uncond = Decoder(model, use_cache) if cfg_scale != 1.0 else None
    def header_next(n: int) -> np.ndarray:  # the header's last token predicts the tile at (0, 0)
        out = np.full((n, 2), -1, np.int64)
        out[-1] = 0
        return out

    hc, lc = cond.feed(list(prompt_ids) + header, next_cells=header_next(len(prompt_ids) + len(header)))
    hu, lu = uncond.feed([vocab.bos_id] + header, next_cells=header_next(1 + len(header))) if uncond else (None, None)
    if vocab.interface == "bpe":
        if bpe is None:
            raise ValueError("the bpe interface needs the VisualBPE to constrain tiles")
        tiling = bpe.start_decoding((H, W))
        tiles = []
        lo = vocab.visual_base
        while not tiling.done:
            valid = torch.from_numpy(tiling.valid_mask()).to(lc.device)
            allowed = lc[lo:lo + bpe.vocab_size].masked_fill(~valid, float("-inf"))  # plausible tiles are valid ones
            logits = _guided(allowed, None if lu is None else lu[lo:lo + bpe.vocab_size], cfg_scale)
            tile = int(pick(logits.unsqueeze(0), temperature, top_k, generator)[0])
            anchor = np.asarray([tiling.next_cell()])
            tiling.push(tile)
            tiles.append(tile)
            following = np.asarray([(-1, -1) if tiling.done else tiling.next_cell()])
            hc, lc = cond.feed([lo + tile], cells=anchor, next_cells=following)
            if uncond:
                hu, lu = uncond.feed([lo + tile], cells=anchor, next_cells=following)
        return bpe.decode(np.asarray(tiles, np.int32), (H, W))
    cells = []
    for i in range(H * W):
        cell = np.stack([head.sample(hc[None], None if hu is None else hu[None], cfg_scale, temperature, top_k,
                                     generator)[0].cpu().numpy() for head in model.depth_heads])  # (C, D)
        cells.append(cell)
        anchor = np.asarray([divmod(i, W)])
        following = np.asarray([divmod(i + 1, W) if i + 1 < H * W else (-1, -1)])
        hc, lc = cond.feed([vocab.cell], cell[None], anchor, following)
        if uncond:
            hu, lu = uncond.feed([vocab.cell], cell[None], anchor, following)
    return np.stack(cells).reshape(H, W, len(model.depth_heads), model.depth)


@torch.no_grad()
def decode_pixels(tokenizer, codes: np.ndarray, interface: str) -> np.ndarray:
    """Generated codes -> uint8 RGB (H_img, W_img, 3) through the visual tokenizer's decoder
    (the pixel codebook; a bpe grid is the BPE's depth)."""
    grid = codes[:, :, None] if interface == "bpe" else codes[:, :, 0, :]
    device = tokenizer_device(tokenizer)
    img = tokenizer.decode(torch.from_numpy(np.ascontiguousarray(grid)).long().unsqueeze(0).to(device))[0]
    return ((img.float().permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
