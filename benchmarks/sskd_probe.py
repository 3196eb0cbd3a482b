"""What a student's frozen backbone supports: the diagnosis behind SSKD's head-phase start.

Reads the runs of an efficacy study (``python benchmarks/efficacy.py --runs DIR``) and, per row and
seed, measures the last epoch's student:

- ``own head``: test top-1 of the student as trained;
- ``probe``: a multinomial logistic regression (scikit-learn, standardised features) fitted on the
  pooled last-stage features of the training images the students saw (no augmentation), scored on
  the test split: what the backbone supports with a converged linear head (its train top-1 too);
- ``teacher head``: the teacher's classifier reading the student's pooled features (where the
  channels match): whether the student's last stage speaks the teacher's language;
- ``unexplained``: per stage, the share of the teacher's feature variance the student's stage output
  leaves unexplained on the test images, Σ‖s − t‖² / Σ‖t − t̄‖² (where the shapes match);
- ``train top-1``: the last epoch's train accuracy from the run's metrics (augmented batches).

    python benchmarks/sskd_probe.py --runs DIR [--rows sskd sskd_random_head student kd] [--data-dir DIR]

The data split is read from each run's ``config.yaml``, so the probe sees exactly the run's images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, print_table, write_json  # noqa: E402

from distill.data import FashionMNISTDataModule  # noqa: E402
from distill.tools.export import load_network  # noqa: E402
from distill.tools.runs import latest_version, read_metrics, series  # noqa: E402


def split_of(
    run: Path, data_dir: str | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train images, labels), (test images, labels))`` of the run's data, normalised, without augmentation."""
    init_args = dict(yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"])
    init_args.update(pipeline="device", **({"data_dir": data_dir} if data_dir else {}))
    dm = FashionMNISTDataModule(**init_args)
    dm.setup("fit")

    def tensors(dataset):
        images, targets = dm.on_after_batch_transfer((dataset.images, torch.as_tensor(dataset.targets), None), 0)[:2]
        return images, targets

    return tensors(dm.train_set), tensors(dm.test_set)


@torch.no_grad()
def stage_outputs(net, images: torch.Tensor, batch: int = 1000) -> list[torch.Tensor]:
    parts = [net.forward_stages(images[i : i + batch]) for i in range(0, len(images), batch)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def probe(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor) -> tuple[float, float]:
    """Test and train top-1 (%) of a logistic regression on standardised embeddings ``(N, D)``."""
    from sklearn.linear_model import LogisticRegression

    a, b = train.numpy(), test.numpy()
    mean, std = a.mean(0), a.std(0) + 1e-6
    clf = LogisticRegression(max_iter=5000).fit((a - mean) / std, train_y.numpy())
    return 100 * clf.score((b - mean) / std, test_y.numpy()), 100 * clf.score((a - mean) / std, train_y.numpy())


def top1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return 100 * logits.argmax(1).eq(targets).float().mean().item()


@torch.no_grad()
def measure(run: Path, teacher, data, teacher_test: list[torch.Tensor]) -> dict:
    (train_x, train_y), (test_x, test_y) = data
    net = load_network(run / "checkpoints" / "last.ckpt").model
    test_stages = stage_outputs(net, test_x)
    # the pooled embedding the classifier reads (after a final norm, where there is one)
    train_embedding = net.head.features(stage_outputs(net, train_x)[-1])[1]
    test_embedding = net.head.features(test_stages[-1])[1]
    fits = test_stages[-1].shape == teacher_test[-1].shape
    probe_test, probe_train = probe(train_embedding, train_y, test_embedding, test_y)
    train_top1 = series(read_metrics(run), "train/top1")
    return {
        "own_head_test_top1": top1(net.head.classifier(test_embedding), test_y),
        "probe_test_top1": probe_test,
        "probe_train_top1": probe_train,
        "teacher_head_test_top1": top1(teacher.head(test_stages[-1]), test_y) if fits else None,
        "unexplained_variance_per_stage": [
            ((s - t).square().sum() / (t - t.mean(0)).square().sum()).item() if s.shape == t.shape else None
            for s, t in zip(test_stages, teacher_test)
        ],
        "last_epoch_train_top1": 100 * train_top1[-1][1] if train_top1 else None,
    }


def cell(value, fmt: str = ".2f") -> str:
    return "" if value is None else f"{value:{fmt}}"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="an efficacy study's runs directory")
    p.add_argument("--rows", nargs="+", default=["sskd", "sskd_random_head", "student", "kd"])
    p.add_argument("--data-dir", default=None, help="override the runs' data_dir")
    args = p.parse_args(argv)
    teacher_run = latest_version(args.runs / "teacher")
    teacher = load_network(teacher_run / "checkpoints" / "last.ckpt").model
    results, data, teacher_test = [], None, None
    for row in args.rows:
        for seed_dir in sorted((args.runs / row).glob("seed*")):
            run = latest_version(seed_dir)
            if data is None:  # every row of a study reads the same split
                data = split_of(run, args.data_dir)
                teacher_test = stage_outputs(teacher, data[1][0])
            results.append(
                {"row": row, "seed": seed_dir.name, "run": str(run), **measure(run, teacher, data, teacher_test)}
            )
    print_table(
        f"frozen backbones of {args.runs}: test top-1 (%) on {len(data[1][1]) if data else 0} images",
        [
            "row",
            "seed",
            "own head",
            "probe test (train)",
            "teacher head",
            "unexplained variance per stage",
            "train top-1",
        ],
        [
            [
                r["row"],
                r["seed"],
                cell(r["own_head_test_top1"]),
                f"{r['probe_test_top1']:.2f} ({r['probe_train_top1']:.2f})",
                cell(r["teacher_head_test_top1"]),
                " / ".join(cell(v, ".3f") or "–" for v in r["unexplained_variance_per_stage"]),
                cell(r["last_epoch_train_top1"], ".1f"),
            ]
            for r in results
        ],
    )
    write_json("sskd_probe", args, {"results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
