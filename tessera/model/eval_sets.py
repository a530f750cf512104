"""Held-out sets in the formats the field publishes them, and their standard scores. Pure functions
(no model): `tessera.jobs.eval` asks the model and hands the answers here.

    pope      jsonl {"question_id", "image", "text", "label": "yes"|"no"}  (POPE's coco_pope_*.json)
              -> accuracy, precision, recall, F1 (of "yes"), yes-ratio; an answer counts as "yes" when it
              starts with yes, as POPE's own evaluation reads free-form answers
    vqa       jsonl {"question_id", "image", "question" (or "text"), "answers": [10 strings or
              {"answer": ...}] | "answer"} -> VQA accuracy with the official answer normalisation
              (lower case, punctuation, articles, number words, contractions) and min(1, #matches / 3)
              averaged over the ten leave-one-out subsets of the human answers
    captions  jsonl {"image", "captions": [str, ...]} (or "caption") -> CIDEr-D and BLEU-4 of
              `pycocoevalcap` (the COCO caption scorers), on lower-cased, punctuation-free tokens: the
              COCO PTB tokenizer needs Java, which a CPU worker may lack, so the tokenisation is the
              equivalent Python one (stated in the report as `tokenizer`)

Images are resolved under the set's `image_folder` (default: the jsonl's own folder).
"""

from __future__ import annotations

import json
import re

from tessera import storage

KINDS = ("pope", "vqa", "captions")

# ----------------------------------------------------------------------------- loading


def load_items(kind: str, uri: str) -> list[dict]:
    """The rows of a set's jsonl (or JSON array) file, checked for the fields its kind needs.
    Raises ValueError naming the first bad line."""
    text = storage.read_text(uri)
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    need = {"pope": ("image", "text", "label"), "vqa": ("image",), "captions": ("image",)}[kind]
    for i, r in enumerate(rows):
        missing = [k for k in need if k not in r]
        if kind == "vqa":
            missing += [] if ("question" in r or "text" in r) else ["question"]
            missing += [] if ("answers" in r or "answer" in r) else ["answers"]
        if kind == "captions":
            missing += [] if ("captions" in r or "caption" in r) else ["captions"]
        if missing:
            raise ValueError(f"{uri} line {i + 1}: missing {missing} for a {kind} set")
    return rows


def question_of(kind: str, row: dict) -> str:
    return row["text"] if kind == "pope" else row.get("question", row.get("text"))


def answers_of(row: dict) -> list[str]:
    answers = row.get("answers", row.get("answer"))
    answers = answers if isinstance(answers, list) else [answers]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def captions_of(row: dict) -> list[str]:
    caps = row.get("captions", row.get("caption"))
    return caps if isinstance(caps, list) else [caps]


# ----------------------------------------------------------------------------- VQA


CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
                "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
                "havent": "haven't", "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
                "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
                "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
                "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
                "youve": "you've"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
    """The official VQA evaluation's answer processing (vqaEval.py: processPunctuation, then
    processDigitArticle)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_NUMBER, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.lower().split():
        w = NUMBERS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, matches / 3) averaged over the leave-one-out subsets of the human answers (one answer:
    an exact match of the normalised forms)."""
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------- POPE


def pope_says_yes(answer: str) -> bool:
    """POPE's reading of a free-form answer: the first word, without punctuation, is "yes"."""
    words = re.sub(r"[^a-z ]", " ", answer.lower()).split()
    return bool(words) and words[0] == "yes"


def pope_scores(predictions: list[str], labels: list[str]) -> dict:
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        yes, truth = pope_says_yes(pred), label.strip().lower() == "yes"
        tp, fp, tn, fn = tp + (yes and truth), fp + (yes and not truth), tn + (not yes and not truth), fn + (not yes and truth)
    n = max(1, tp + fp + tn + fn)
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-9, precision + recall), "yes_ratio": (tp + fp) / n,
            "questions": tp + fp + tn + fn, "chance_accuracy": max(tp + fn, fp + tn) / n}


# ----------------------------------------------------------------------------- captions


def caption_tokens(text: str) -> str:
    """Lower case, punctuation removed, single spaces: what the COCO PTB tokenizer leaves of a caption."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """CIDEr-D and BLEU-4 (pycocoevalcap) over the set."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {str(i): [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [caption_tokens(p) or "empty"] for i, p in enumerate(predictions)}
    if not gts:
        return {"cider": 0.0, "bleu4": 0.0, "captions": 0}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "captions": len(gts), "tokenizer": "python (lower case, no punctuation)"}
