"""Writes data/sample/oasst_sample.jsonl: a SYNTHETIC sample in the OASST1 message-tree format.

It is not OpenAssistant data. It exists so the quick run and the README's first steps work offline, and it
exercises every filter: prompter turns, a deleted reply, a reply that failed review, a blank reply and
replies in other languages. Its trees are shaped as published OASST2 trees are (the nested messages carry
`"message_tree_id": null` and `"tree_state": null`), and there are enough of them (160) for the quick study's test
split to hold the 20 conversation trees a bootstrap interval needs.
"""

import json
import random
from pathlib import Path

TOPICS = [
    (
        "sort a list in Python",
        "Use sorted(items) to get a new list, or items.sort() to sort in place. Both accept key= and reverse=True.",
    ),
    (
        "boil an egg",
        "Place the egg in boiling water for about nine minutes, then cool it in cold water so the shell comes off "
        "easily.",
    ),
    (
        "learn a new language",
        "Practise a little every day, read simple texts, listen to native speakers and do not fear mistakes.",
    ),
    (
        "save money each month",
        "Track what you spend, set a budget, automate a transfer to savings on payday and cut subscriptions you do not "
        "use.",
    ),
    (
        "start running",
        "Begin with short runs mixed with walking, three times a week, and increase the distance by about ten percent "
        "a week.",
    ),
    (
        "write a cover letter",
        "Open with the role you want, show two achievements that fit it, and close by asking for a conversation.",
    ),
    (
        "improve my sleep",
        "Keep a regular schedule, avoid screens before bed, keep the room dark and cool, and limit caffeine after "
        "noon.",
    ),
    (
        "explain photosynthesis",
        "Plants use light energy to turn carbon dioxide and water into sugar and oxygen inside their chloroplasts.",
    ),
    (
        "use git branches",
        "Create a branch with git switch -c name, commit your work there, and merge it back when it is reviewed.",
    ),
    (
        "make bread at home",
        "Mix flour, water, salt and yeast, knead for ten minutes, let it rise, shape it and bake it in a hot oven.",
    ),
    (
        "prepare for an interview",
        "Research the company, practise answers to common questions aloud and prepare two questions of your own.",
    ),
    (
        "keep houseplants alive",
        "Water when the top of the soil is dry, give them indirect light and repot them when the roots fill the pot.",
    ),
]
STYLES = [
    "Here is a short answer. {answer}",
    "Good question! {answer} Let me know if you want more detail.",
    "{answer} In short, small steady steps work best.",
    "There are a few ways to do this. {answer} I hope this helps.",
]
TREES = 160
FOLLOW_UPS = ["Can you give an example?", "Why does that work?", "What should I avoid?"]
FOLLOW_ANSWERS = [
    "For example, start with the simplest version, check the result, then adjust one thing at a time.",
    "It works because each step removes one source of trouble before the next one begins.",
    "Avoid doing everything at once; rushing is the most common reason it goes wrong.",
]


def message(message_id, parent_id, role, text, lang="en", **extra):
    fields = {
        "message_id": message_id,
        "parent_id": parent_id,
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": 0,
        "synthetic": True,
        "message_tree_id": None,
        "tree_state": None,
    }
    fields.update(extra)
    fields["replies"] = []
    return fields


def build_tree(tree_index: int, rng: random.Random) -> dict:
    topic, answer = TOPICS[tree_index % len(TOPICS)]
    tree_id = f"sample-tree-{tree_index:03d}"
    prompt = message(f"{tree_id}-m0", None, "prompter", f"How do I {topic}?")
    for reply_index in range(3):
        style = STYLES[(tree_index + reply_index) % len(STYLES)]
        reply = message(
            f"{tree_id}-a{reply_index}",
            prompt["message_id"],
            "assistant",
            style.format(answer=answer),
            rank=reply_index,
        )
        follow = message(f"{tree_id}-p{reply_index}", reply["message_id"], "prompter", rng.choice(FOLLOW_UPS))
        follow["replies"].append(
            message(f"{tree_id}-f{reply_index}", follow["message_id"], "assistant", rng.choice(FOLLOW_ANSWERS))
        )
        reply["replies"].append(follow)
        prompt["replies"].append(reply)
    if tree_index % 5 == 0:
        prompt["replies"].append(
            message(f"{tree_id}-deleted", prompt["message_id"], "assistant", "This reply was deleted.", deleted=True)
        )
    if tree_index % 6 == 0:
        prompt["replies"].append(
            message(
                f"{tree_id}-rejected", prompt["message_id"], "assistant", "Rejected by review.", review_result=False
            )
        )
    if tree_index % 7 == 0:
        prompt["replies"].append(message(f"{tree_id}-blank", prompt["message_id"], "assistant", "   "))
    if tree_index % 4 == 0:
        prompt["replies"].append(
            message(f"{tree_id}-de", prompt["message_id"], "assistant", "Eine kurze Antwort auf Deutsch.", lang="de")
        )
    return {"message_tree_id": tree_id, "tree_state": "ready_for_export", "synthetic_sample": True, "prompt": prompt}


def main() -> None:
    rng = random.Random(0)
    path = Path(__file__).resolve().parents[1] / "data" / "sample" / "oasst_sample.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        for tree_index in range(TREES):
            stream.write(json.dumps(build_tree(tree_index, rng)) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
