"""Small learnable sentence-pair sets in GLUE's file layouts, with a vocabulary, from a seed.

For tests, CPU quick starts and a real fine-tuning run where GLUE is absent. Each sentence
asks about one topic with one verb, e.g. "how do i learn chess ?" / "what is the best way to
study chess ?". QQP: duplicate (1) iff both name the same topic. MNLI: entailment iff same
topic and verb, neutral iff same topic only, contradiction otherwise. Classes are balanced
in expectation. Every word is in bert-base-uncased's vocabulary (so the MiniLM checkpoint
can read the sets too); ``vocab.txt`` written beside them holds just these words.

    python -m nlp.fixtures ROOT [--task qqp|mnli] [--train 4000] [--dev 1000] [--seed 0]
"""
import argparse
import random
from pathlib import Path

TOPICS = ("python", "guitar", "chess", "piano", "french", "spanish", "math", "physics",
          "history", "cooking", "swimming", "painting", "photography", "chemistry", "biology",
          "economics", "poetry", "dancing", "singing", "drawing", "german", "japanese", "music",
          "tennis", "golf", "football", "baseball", "yoga", "running", "writing", "reading",
          "programming", "statistics", "philosophy", "geography", "astronomy", "sculpture",
          "knitting", "surfing", "skiing")
VERBS = ("learn", "study", "practice", "master", "improve", "understand", "enjoy", "teach")
TEMPLATES = ("how do i {verb} {topic} ?", "what is the best way to {verb} {topic} ?",
             "how can i {verb} {topic} quickly ?", "where should i {verb} {topic} ?",
             "is it hard to {verb} {topic} ?", "why should i {verb} {topic} at home ?")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# task -> (folder, header, dev splits, label strings by class index of _pair)
LAYOUTS = {
    "qqp": ("QQP", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            ("dev",), ("0", "1")),
    "mnli": ("MNLI", ("index", "genre", "sentence1", "sentence2", "gold_label"),
             ("dev_matched", "dev_mismatched"), ("contradiction", "neutral", "entailment")),
}


def write_pairs(root, task: str, num_train: int, num_dev: int, seed: int) -> Path:
    """Write ``<root>/QQP/{train,dev}.tsv`` (task qqp) or ``<root>/MNLI/{train,dev_matched,
    dev_mismatched}.tsv`` (mnli), each dev split ``num_dev`` rows, and ``<root>/vocab.txt``;
    return ``root`` (a valid ``data_dir``)."""
    if task not in LAYOUTS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(LAYOUTS)}")
    folder, header, dev_splits, labels = LAYOUTS[task]
    root = Path(root)
    (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), *((s, num_dev) for s in dev_splits)):
        rng = random.Random(f"{seed}/{task}/{split}")
        lines = ["\t".join(header)]
        for i in range(count):
            first, second, label = _pair(rng, len(labels))
            ids = (str(i), str(2 * i), str(2 * i + 1)) if task == "qqp" else (str(i), "generated")
            lines.append("\t".join((*ids, first, second, labels[label])))
        (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    words = sorted({w for text in (*TEMPLATES, *TOPICS, *VERBS) for w in text.split()
                    if not w.startswith("{")})
    (root / "vocab.txt").write_text("\n".join((*SPECIAL_TOKENS, *words)) + "\n", encoding="utf-8")
    return root


def _pair(rng: random.Random, num_labels: int) -> tuple[str, str, int]:
    """Two questions and their class: 0 different topics, 1 same topic (2 classes) or
    same topic and another verb (3 classes), 2 same topic and verb."""
    label = rng.randrange(num_labels)
    topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
    other_topic = rng.choice([t for t in TOPICS if t != topic]) if label == 0 else topic
    if num_labels == 3 and label == 1:
        other_verb = rng.choice([v for v in VERBS if v != verb])
    elif num_labels == 3 and label == 2:
        other_verb = verb
    else:
        other_verb = rng.choice(VERBS)
    first = rng.choice(TEMPLATES).format(verb=verb, topic=topic)
    second = rng.choice(TEMPLATES).format(verb=other_verb, topic=other_topic)
    return first, second, label


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to write (a data_dir for nlp/main.py)")
    parser.add_argument("--task", default="qqp", choices=sorted(LAYOUTS))
    parser.add_argument("--train", type=int, default=4000, help="training pairs")
    parser.add_argument("--dev", type=int, default=1000, help="pairs per dev split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_pairs(args.root, args.task, args.train, args.dev, args.seed))
