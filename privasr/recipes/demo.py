"""`privasr demo`: build the corpus if absent, train the small model, evaluate on unseen
test speakers (greedy and beam + word LM from training text), print a WER table, and write
``runs/demo/results.json`` and ``runs/demo/report.html``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from privasr.atomic import atomic_write_text
from privasr.config import load_config
from privasr.paths import recipe_path
from privasr.report.html import write_report

QUICK = ["out_dir=runs/demo-quick", "data.corpus_dir=data/synth-quick", "data.synth_hours=0.3",
         "data.synth_speakers=120", "data.max_dev_utts=40", "model.size=tiny",
         "optim.max_steps=150", "optim.warmup_steps=30", "eval_every=50", "ckpt_every=50"]

# (LM weight, word bonus, out-of-lexicon penalty) tried on dev. Sweeps on demo checkpoints
# found heavier LM weights hurt (7 % of dev words are not in the training text) and a stiffer
# penalty for leaving the lexicon helps (dev WER 26.5 % at -3, 23.3 % at -7; hard lexicon 33.6 %).
LM_GRID = ((0.2, 0.5, -3.0), (0.2, 0.5, -5.0), (0.2, 0.5, -7.0), (0.3, 1.0, -7.0))


def decode_test_with_lm(cfg, log=print) -> dict:
    """Beam search + word n-gram LM (training transcripts only), weight tuned on dev."""
    from privasr.data.manifest import read_manifest
    from privasr.decoding.lm import WordNgramLM
    from privasr.decoding.metrics import error_report
    from privasr.inference import decode_beam, load_model
    from privasr.decoding.evaluate import predict
    from privasr.data.splits import load_split, manifest_paths
    from privasr.data.manifest import SkipReport
    from privasr.data.tokenizer import CharTokenizer

    paths = manifest_paths(cfg)
    model, vocab = load_model(Path(cfg.out_dir) / "last.pt")
    lm = WordNgramLM.from_transcripts(u.text for u in read_manifest(paths["train"]))
    tok, rep = CharTokenizer(tuple(vocab)), SkipReport()
    dev = predict(model, load_split(paths["dev"], cfg, tok, rep, limit=60), vocab,
                  keep_log_probs=True)
    best = None
    for w, bonus, oov in LM_GRID:
        r = error_report(dev.refs, decode_beam(dev.log_probs, vocab, beam=8, lm=lm, lm_weight=w,
                                               word_bonus=bonus, oov_penalty=oov))
        log(f"  dev: LM weight {w}, word bonus {bonus}, OOV penalty {oov}: WER {r['wer']:.2%}")
        if best is None or r["wer"] < best[3]:
            best = (w, bonus, oov, r["wer"])
    w, bonus, oov, _ = best
    test = predict(model, load_split(paths["test"], cfg, tok, rep), vocab, keep_log_probs=True)
    hyps = decode_beam(test.log_probs, vocab, beam=16, lm=lm, lm_weight=w, word_bonus=bonus,
                       oov_penalty=oov)
    r = error_report(test.refs, hyps)
    examples = [{"ref": a, "hyp": b} for a, b in list(zip(test.refs, hyps))[:8]]
    return {"lm_weight": w, "word_bonus": bonus, "oov_penalty": oov, "wer": r["wer"], "cer": r["cer"], "examples": examples,
            "lm_order": lm.order, "lm_vocabulary": len(lm.vocabulary)}


def run_demo(quick: bool = False, overrides: list[str] = (), log=print) -> dict:
    from privasr.recipes.train import run_training

    t0 = time.time()
    cfg = load_config(recipe_path("demo"), (QUICK if quick else []) + list(overrides))
    res = run_training(cfg, log=log)
    log("decoding the test set with beam search + word LM ...")
    lm = decode_test_with_lm(cfg, log=log)
    res.update({"test_wer_greedy": res["test_wer"], "test_cer_greedy": res["test_cer"],
                "test_wer": lm["wer"], "test_cer": lm["cer"], "decoder": "beam16+word3gram",
                "lm": {k: v for k, v in lm.items() if k not in ("wer", "cer")},
                "wall_seconds": time.time() - t0, "quick": quick})
    out = Path(cfg.out_dir)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1))
    table = [{"decoder": "greedy", "test WER": res["test_wer_greedy"],
              "test CER": res["test_cer_greedy"]},
             {"decoder": f"beam 16 + word 3-gram LM (w={lm['lm_weight']}, "
                          f"bonus={lm['word_bonus']}, oov={lm['oov_penalty']})",
              "test WER": lm["wer"], "test CER": lm["cer"]}]
    log(f"\n{'decoder':<40} {'WER':>7} {'CER':>7}   ({res['test_utts']} utterances, "
        f"{res['test_speakers']} unseen speakers)")
    for row in table:
        log(f"{row['decoder']:<40} {row['test WER']:7.2%} {row['test CER']:7.2%}")
    log(f"wall time {res['wall_seconds'] / 60:.1f} min, {res['steps']} steps, "
        f"{res['audio_hours_seen']:.1f} h of audio seen")
    report = write_report(out, "privasr demo: Conformer-CTC on the embedded corpus",
                          {"Test set (unseen speakers, unseen sentences)": table,
                           "Examples": lm["examples"],
                           "Run": [{k: res[k] for k in ("steps", "wall_seconds", "parameters",
                                                         "audio_hours_seen", "train_utts",
                                                         "device", "threads")}]})
    log(f"wrote {out / 'results.json'} and {report}")
    return res
