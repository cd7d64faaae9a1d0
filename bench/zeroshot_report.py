"""Zero-shot accuracy of a pretrained CLIP per domain, on the seen and the unseen classes of a dataset."""
from __future__ import annotations

import torch
from tabulate import tabulate

from bench import text
from bench.cards import load_card
from bench.data import ImageItems
from bench.layouts import ensure_generated, scan_domain
from bench.models import load_clip


@torch.no_grad()
def accuracy_table(model_name: str, pretrained: str | None, dataset: str, root: str) -> list[dict]:
    card = load_card(dataset)
    ensure_generated(card, root, progress=True)
    clip = load_clip(model_name, pretrained)
    model = clip.model.eval()
    groups = {"seen": card.seen_classes, "unseen": card.unseen_classes}
    heads = {g: text.class_weights(text.raw_embeddings(lambda t: text.encode_text(model, t), clip.tokenize, card.prompt_names(cls),
                                                       card.templates, "cpu"))
             for g, cls in groups.items() if cls}
    rows = []
    for domain in card.domains:
        items = scan_domain(root, card, domain)
        row = {"domain": domain}
        for g, classes in groups.items():
            if not classes:
                continue
            index = {card.classes.index(c): i for i, c in enumerate(classes)}
            sub = [(p, index[k]) for p, k in items if k in index]
            loader = torch.utils.data.DataLoader(ImageItems(sub, clip.preprocess_val), batch_size=512)
            correct = 0
            for x, y, _ in loader:
                feats = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
                correct += (feats @ heads[g].t()).argmax(-1).eq(y).sum().item()
            row[g] = correct / len(sub)
            row[f"{g}_chance"] = 1 / len(classes)
            row[f"{g}_n"] = len(sub)
        rows.append(row)
    return rows


def report(model_name: str, pretrained: str | None, dataset: str, root: str) -> str:
    rows = accuracy_table(model_name, pretrained, dataset, root)
    groups = [g for g in ("seen", "unseen") if g in rows[0]]
    headers = ["domain"] + [f"{g} classes ({round(1 / rows[0][g + '_chance'])}-way, chance "
                            f"{100 * rows[0][g + '_chance']:.1f}%)" for g in groups]
    body = [[r["domain"]] + [f"{100 * r[g]:.1f}" for g in groups] for r in rows]
    body.append(["mean"] + [f"{100 * sum(r[g] for r in rows) / len(rows):.1f}" for g in groups])
    return (f"zero-shot accuracy (%) of {model_name} / {pretrained} on {dataset}\n\n"
            + tabulate(body, headers=headers, tablefmt="github"))
