"""On a CUDA device (skipped where a process that sees this machine's GPUs finds none): the model there gives the
CPU's outputs, and a short run trains, saves, resumes and scores. The CUDA work runs in subprocesses: every other
test keeps torch in the test process on the CPU (conftest)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cuda_available, environ, gpu_env, run_cli  # noqa: F401 (the skip's condition)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif("not cuda_available()", reason="no CUDA device on this machine")]

PARITY = r'''
import json
import torch
from bert_dist.config import preset
from bert_dist.data.collate import MLMCollator, PadCollator
from bert_dist.model import BertForPreTraining, BertForSequenceClassification

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
cfg = preset("tiny", vocab_size=97, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
g = torch.Generator().manual_seed(0)
rows = [{"input_ids": torch.randint(5, 97, (n,), generator=g).tolist(), "token_type_ids": [0] * n, "labels": n % 2,
         "next_sentence_label": n % 2, "idx": i} for i, n in enumerate((40, 23, 7, 40))]
out = {}
for name, model, collate in (("classification", BertForSequenceClassification(cfg, 2), PadCollator(0)),
                             ("pretraining", BertForPreTraining(cfg), MLMCollator(4, 97, [1, 2, 3], seed=1))):
    batch = collate(rows)
    results = {}
    for device in ("cpu", "cuda"):
        m = model.to(device).train()
        m.zero_grad()
        loss = m(**{k: v.to(device) for k, v in batch.items()})["loss"]
        loss.backward()
        results[device] = (loss.item(), torch.cat([p.grad.flatten().cpu() for p in m.parameters()]))
        with torch.autocast(device, dtype=torch.bfloat16):
            results[device + "-bf16"] = m(**{k: v.to(device) for k, v in batch.items()})["loss"].item()
    out[name] = {"loss_cpu": results["cpu"][0], "loss_cuda": results["cuda"][0],
                 "grad_diff": (results["cpu"][1] - results["cuda"][1]).abs().max().item(),
                 "grad_scale": results["cpu"][1].abs().max().item(),
                 "bf16_cpu": results["cpu-bf16"], "bf16_cuda": results["cuda-bf16"]}
print(json.dumps(out))
'''


def test_the_model_on_cuda_gives_the_cpus_loss_and_gradients():
    """Fine-tuning and pretraining heads on a padded collated batch (the unpadded encoder, the masked positions):
    the same loss and gradients on the GPU as on the CPU (fp32, TF32 off), and a bf16 loss close to it."""
    p = subprocess.run([sys.executable, "-c", PARITY], env=environ(gpu_env()), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name, r in json.loads(p.stdout.strip().splitlines()[-1]).items():
        assert abs(r["loss_cpu"] - r["loss_cuda"]) < 1e-4, (name, r)
        assert r["grad_diff"] < 1e-4 * max(1.0, r["grad_scale"]), (name, r)
        assert abs(r["bf16_cuda"] - r["loss_cpu"]) < 0.05, (name, r)


def test_a_five_step_run_on_cuda_saves_resumes_and_scores(tmp_path):
    out = tmp_path / "run"
    flags = ["--task", "sst2", "--smoke", "--mixed-precision", "bf16", "--save-every", "5", "--output-dir", str(out)]
    first = run_cli([*flags, "--max-steps", "5"], env=gpu_env())
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["hardware"]["device_type"] == "cuda" and results["steps"] == 5
    again = run_cli([*flags, "--max-steps", "7", "--resume"], env=gpu_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 7
