"""Writes the demo datasets in data/ (dev-only; the outputs are committed).

A small synthetic world a tiny model can learn in minutes on a CPU: fruit colours, small sums,
reversing and upper-casing words, counting, and who the assistant is. Seeded, so reruns are identical.
"""
import json
import random

rng = random.Random(42)
FRUITS = {
    "banana": "yellow", "apple": "red", "lime": "green", "orange": "orange", "grape": "purple",
    "blueberry": "blue", "lemon": "yellow", "cherry": "red", "kiwi": "brown", "plum": "purple",
    "pear": "green", "coconut": "brown",
}
WORDS = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain", "book", "lamp", "frog",
         "cake", "ship", "rose", "wolf", "milk", "door", "king", "gold"]
NAME = "Llama Demo"
IDENTITY_Q = ["Who are you?", "What is your name?", "Introduce yourself.", "What are you?"]
IDENTITY_A = f"I am {NAME}, a tiny model trained with LlamaBoard."


def task():
    kind = rng.choice(["fruit", "sum", "reverse", "upper", "count", "identity"])
    if kind == "fruit":
        f = rng.choice(list(FRUITS))
        return f"What color is a {f}?", "", f"A {f} is {FRUITS[f]}."
    if kind == "sum":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return "Add the two numbers.", f"{a} and {b}", f"{a} plus {b} is {a + b}."
    if kind == "reverse":
        w = rng.choice(WORDS)
        return "Reverse the letters of the word.", w, w[::-1]
    if kind == "upper":
        w = " ".join(rng.sample(WORDS, 2))
        return "Write the words in capital letters.", w, w.upper()
    if kind == "count":
        n = rng.randint(2, 9)
        return f"Count from 1 to {n}.", "", " ".join(str(i) for i in range(1, n + 1))
    return rng.choice(IDENTITY_Q), "", IDENTITY_A


def wrong(answer):
    return rng.choice([
        "I don't know.", "Maybe something else.", answer[::-1] if len(answer) > 3 else "No.",
        "That is not something I can answer.",
    ])


def user_text(instruction, inp):
    return instruction + ("\n" + inp if inp else "")


sft = [{"instruction": i, "input": x, "output": o} for i, x, o in (task() for _ in range(400))]

chat = []
for _ in range(150):
    turns = []
    for _ in range(rng.randint(1, 3)):
        i, x, o = task()
        turns += [{"from": "human", "value": user_text(i, x)}, {"from": "gpt", "value": o}]
    ex = {"conversations": turns}
    if rng.random() < 0.3:
        ex["system"] = "You are a helpful assistant. Answer briefly."
    chat.append(ex)

dpo = []
for _ in range(200):
    i, x, o = task()
    dpo.append({"instruction": i, "input": x, "chosen": o, "rejected": wrong(o)})

kto = []
for _ in range(200):
    i, x, o = task()
    good = rng.random() < 0.5
    kto.append({"messages": [{"role": "user", "content": user_text(i, x)},
                             {"role": "assistant", "content": o if good else wrong(o)}], "label": good})

pt = []
for _ in range(300):
    f = rng.choice(list(FRUITS))
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    w = rng.choice(WORDS)
    pt.append(rng.choice([
        f"A {f} is {FRUITS[f]}. People like to eat a {f} when it is ripe.",
        f"{a} plus {b} is {a + b}. Adding numbers is easy when you count carefully.",
        f"The word {w} written backwards is {w[::-1]}, and in capitals it is {w.upper()}.",
        f"{NAME} is a tiny model. It was trained with LlamaBoard on a small computer.",
    ]))

with open("data/demo_sft.json", "w") as fh:
    json.dump(sft, fh, indent=2, ensure_ascii=False)
with open("data/demo_chat.json", "w") as fh:
    json.dump(chat, fh, indent=2, ensure_ascii=False)
with open("data/demo_dpo.json", "w") as fh:
    json.dump(dpo, fh, indent=2, ensure_ascii=False)
with open("data/demo_kto.json", "w") as fh:
    json.dump(kto, fh, indent=2, ensure_ascii=False)
with open("data/demo_pt.txt", "w") as fh:
    fh.write("\n".join(pt) + "\n")
