"""How spread a visual tokenizer's codes are on the held-out images: distinct codes an image and the share
of the grid the most common code (the plain background) takes. A tokenizer that splits the background over
several codes leaves BPE less to merge (more tokens an image) and a generator more equivalent codes to choose
between (README "Learning", "Text -> image", item 9).

    PYTHONPATH=. python experiments/tokenizer_codes.py HELDOUT_DIR TOKENIZER [TOKENIZER ...]
"""

import sys

import torch

from tessera.model.evaluate import HeldOut, image_tensor
from tessera.tokenize.tokenizer import load_tokenizer
from tessera.tokenize.trainer import code_spread


@torch.no_grad()
def spread(tokenizer, held: HeldOut) -> tuple[float, float]:
    """(distinct pixel codes an image, share of its 16x16 grid the most common code takes), held-out means."""
    images = torch.cat([image_tensor(held.images[s["image"]]) for s in held.scenes])
    return code_spread(tokenizer.encode(images)["pixel"][..., 0])


def main() -> None:
    held = HeldOut.load(sys.argv[1], 64)
    for path in sys.argv[2:]:
        distinct, top = spread(load_tokenizer(path)[0].eval(), held)
        print(f"{path}: {distinct:.1f} distinct codes an image, the most common code {top:.3f} of the grid", flush=True)


if __name__ == "__main__":
    main()
