"""torchrun worker of test_megatron_backend.py: scores the requests of a JSON file with the
Megatron backend at each TPxPP layout and writes every rank's results (OUT.<layout>.rank<r>.json)."""
import json
import sys

import torch.distributed as dist

from lep_megatron.evaluation.backends.megatron import MegatronBackend


def score(backend: MegatronBackend, req: dict) -> dict:
    gens = backend.generate(req["prompts"], req["max_new_tokens"], req["stop_strings"])
    return {
        "next_token_logprobs": backend.next_token_logprobs(req["batch"]).tolist(),
        "token_logprobs": [lp.tolist() for lp in backend.token_logprobs(req["batch"])],
        "generate_ids": backend.generate_ids(req["batch"], req["max_new_tokens"], req["eos_ids"], []),
        "choice_probs": backend.choice_probs(req["prompts"], req["choices"]),
        "span_logprobs": backend.span_logprobs(req["span_texts"], req["span_starts"]),
        "generate": [[g.text, g.ids, g.ids_text] for g in gens],
    }


def main() -> None:
    ckpt, requests, out, layouts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    with open(requests) as f:
        req = json.load(f)
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        backend = MegatronBackend.from_checkpoint(ckpt, tp=tp, pp=pp)
        with open(f"{out}.{layout}.rank{dist.get_rank()}.json", "w") as f:
            json.dump(score(backend, req), f)


if __name__ == "__main__":
    main()
