"""The ``xai`` command line. Its root knows only the core commands (explain, train, plugins, data);
registry and pipeline commands, and third-party ones, arrive through ``xai_register_commands``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import torch
import yaml

from core.errors import InputError, XAIError, one_line
from core.isolation import DEFAULT_TIMEOUT
from core.redact import redact_text


def _host():
    from core.plugins import get_host

    return get_host()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="xai-mlops", prog_name="xai")
def cli() -> None:
    """Explain image models, check the explanations, and gate deployment on the result.

    \b
    Quick start:
      xai data shapes --out probe --n 32          # a probe set with ground-truth masks
      xai train --out model.pt                    # the reference CNN on `shapes` (CPU, ~1 min)
      xai explain --model model.pt --images probe/images --masks probe/masks \\
                  --methods saliency,grad_cam --out report/
      xai plugins                                 # every method, metric and reporter available
    """


def load_any_model(spec: str, unsafe: bool = False):
    """A model from a file path, or from any URI a plugin can load (``models:/name/version``)."""
    from core.models import load_model

    if "://" in spec or spec.startswith("models:/"):
        loaded = _host().hook.xai_load_model(uri=spec, unsafe=unsafe)
        if loaded is None:
            raise XAIError(f"no plugin can load {spec!r} (install the registry extra for models:/ URIs)")
        return loaded
    return load_model(spec, unsafe=unsafe)


def parse_params(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``method.key=value`` pairs -> {method: {key: value}} (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise InputError(f"--param {item!r}: expected METHOD.KEY=VALUE, e.g. grad_cam.layer=features")
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        out.setdefault(method, {})[name] = yaml.safe_load(value)
    return out


def load_masks(folder: Path, names: list[str], size: tuple[int, int]) -> torch.Tensor | None:
    """Binary masks with the same relative names as the images (any image format, non-zero = in)."""
    import numpy as np
    from PIL import Image

    masks = []
    for name in names:
        stem = Path(name).with_suffix("")
        candidates = [folder / name] + [folder / f"{stem}{ext}" for ext in (".png", ".bmp", ".gif")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            click.echo(f"warning: no mask for {name} in {folder}; localization metrics skipped", err=True)
            return None
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L").resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0
        masks.append(torch.from_numpy(arr.copy()))
    return torch.stack(masks) if masks else None


def print_summary(results, report_paths: dict[str, str]) -> None:
    rows = []
    keys = ["localization.pointing_game", "localization.relevance_mass"]
    for label, exp in results.explanations.items():
        m = results.metrics.get(label, {})
        per_image = exp.seconds / max(1, len(results.image_names)) * 1000
        rows.append(
            [label, f"{per_image:.1f}"]
            + [f"{m[k]:.3f}" if isinstance(m.get(k), float) else "-" for k in keys]
        )
    header = ["method", "ms/image", "pointing game", "relevance mass"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    base = results.metrics and next(iter(results.metrics.values())).get("localization.random_pointing")
    if isinstance(base, float):
        click.echo(f"(random pointing-game baseline: {base:.3f})")
    for name, path in report_paths.items():
        click.echo(f"{name} report: {path}")


def _read_config(path: Path) -> dict[str, Any]:
    """The ``--config`` YAML: a mapping with optional ``methods`` (a mapping or list) and ``metrics``."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"--config {str(path)!r}: cannot read it: {one_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise InputError(
            f"--config {str(path)!r}: expected a mapping with methods: and metrics:, "
            f"not a {type(cfg).__name__}"
        )
    if not isinstance(cfg.get("methods", {}), (dict, list)):
        raise InputError(f"--config {str(path)!r}: 'methods' must be a mapping of name -> params (or a list)")
    if not isinstance(cfg.get("metrics", []), list) or not all(
        isinstance(m, str) for m in cfg.get("metrics", [])
    ):
        raise InputError(f"--config {str(path)!r}: 'metrics' must be a list of metric names")
    return cfg


def _parse_device(spec: str) -> str | torch.device:
    if spec == "auto":
        return spec
    try:
        return torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(
            f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or another torch device"
        ) from None


def check_device(device: torch.device) -> torch.device:
    """``device`` if this machine has it, else a one-line ``InputError``."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {device}: no CUDA device on this machine (use cpu or auto)")
        if device.index is not None and device.index >= count:
            raise InputError(
                f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif device.type not in ("cpu", "meta"):
        try:
            torch.empty(1, device=device)
        except Exception:
            raise InputError(f"--device {device}: not available on this machine") from None
    return device


@cli.command()
@click.option(
    "--model", "model_spec", required=True, help="Checkpoint/TorchScript file, or models:/NAME/VERSION."
)
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder of images: flat, or one subfolder per class (labels from folder names).",
)
@click.option(
    "--methods", default="saliency,grad_cam", show_default=True, help="Comma-separated explainer names."
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder for the reports."
)
@click.option(
    "--metrics", default="localization", show_default=True, help="Comma-separated metric names ('' for none)."
)
@click.option("--reporters", default="json,html", show_default=True, help="Comma-separated reporter names.")
@click.option(
    "--masks",
    "masks_dir",
    type=click.Path(path_type=Path),
    help="Ground-truth masks, same names as the images.",
)
@click.option(
    "--spurious-masks",
    "spurious_dir",
    type=click.Path(path_type=Path),
    help="Known shortcut regions (e.g. a watermark).",
)
@click.option(
    "--target",
    default="predicted",
    show_default=True,
    help="'predicted', 'label' (from class folders) or a class index.",
)
@click.option("--param", "params", multiple=True, help="METHOD.KEY=VALUE method parameter; repeatable.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="YAML with methods: {name: {params}}, metrics: [...] (overrides --methods/--metrics).",
)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1 ..."
)
@click.option(
    "--preprocess",
    "preprocess_spec",
    help="JSON (file or inline) with size, mean, std: needed when the model has none stored.",
)
@click.option(
    "--convert",
    is_flag=True,
    help="Convert grayscale/RGBA/palette images to the model's channels instead of refusing them.",
)
@click.option(
    "--unsafe-load", is_flag=True, help="Allow loading pickled model files (can run arbitrary code)."
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=float,
    help="Time limit per plugin call, seconds.",
)
@click.option("--limit", type=int, help="Explain at most this many images.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def explain(
    model_spec,
    images_dir,
    methods,
    out_dir,
    metrics,
    reporters,
    masks_dir,
    spurious_dir,
    target,
    params,
    config_file,
    batch_size,
    device,
    preprocess_spec,
    convert,
    unsafe_load,
    timeout,
    limit,
    no_progress,
):
    """Explain a folder of images with one or more methods and write JSON and HTML reports.

    Bad image files are reported one line each on stderr and skipped; the others are still
    explained and reported (exit status 1 when anything was skipped or a plugin failed).
    """
    from core import workflow
    from core.engine import resolve_device
    from core.images import load_folder
    from core.preprocess import Preprocess

    method_params = parse_params(params)
    metric_list = [m for m in metrics.split(",") if m.strip()]
    method_cfg: Any = {m.strip(): method_params.get(m.strip(), {}) for m in methods.split(",") if m.strip()}
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {str(out_dir)!r} is an existing file, not a folder")
    if config_file:
        cfg = _read_config(config_file)
        method_cfg = cfg.get("methods", method_cfg)
        metric_list = cfg.get("metrics", metric_list)
    reporter_list = [r for r in reporters.split(",") if r.strip()]
    workflow.validate_names(method_cfg, metric_list, reporter_list)
    loaded = load_any_model(model_spec, unsafe=unsafe_load)
    pre = Preprocess.load(preprocess_spec) if preprocess_spec else loaded.preprocess
    if pre is None:
        raise InputError(
            'the model has no stored preprocessing: pass --preprocess \'{"size": 224, '
            '"mean": [...], "std": [...]}\''
        )
    imgs = load_folder(images_dir, pre, loaded.class_names, convert=convert, limit=limit)
    for s in imgs.skipped:
        click.echo(f"error: {one_line(s['reason'])}", err=True)
    if not imgs.names:
        raise InputError(f"none of the images in {str(images_dir)!r} could be read")
    dev = check_device(resolve_device(_parse_device(device), None))
    model = loaded.model.to(dev)
    targets: Any = None
    if target == "label":
        if imgs.labels is None:
            raise InputError("--target label needs class folders named like the model's classes")
        targets = imgs.labels
    elif target != "predicted":
        try:
            targets = int(target)
        except ValueError:
            raise InputError(f"--target {target!r}: expected 'predicted', 'label' or a class index") from None
    hw = pre.hw or tuple(imgs.images.shape[-2:])
    masks = load_masks(masks_dir, imgs.names, hw) if masks_dir else None
    spurious = load_masks(spurious_dir, imgs.names, hw) if spurious_dir else None
    meta = {
        "model": {"source": model_spec, **({"arch": loaded.arch} if loaded.arch else {})},
        "images": str(images_dir),
    }
    results = workflow.run(
        model,
        pre.normalize(imgs.images),
        method_cfg,
        images=imgs.images,
        targets=targets,
        labels=imgs.labels,
        image_names=imgs.names,
        class_names=loaded.class_names,
        masks=masks,
        spurious_masks=spurious,
        metrics=metric_list,
        reporters=reporter_list,
        out_dir=out_dir,
        batch_size=batch_size,
        device=dev,
        timeout=timeout,
        progress=not no_progress,
        meta=meta,
        skipped_inputs=imgs.skipped,
    )
    for f in results.failures:
        click.echo(
            one_line(f"error: {f.stage} {f.name} failed ({f.kind}): {redact_text(f.message)}"), err=True
        )
    print_summary(results, results.meta.get("reports", {}))
    if results.failures or imgs.skipped:
        sys.exit(1)


@cli.command()
@click.option(
    "--arch", type=click.Choice(["deconvolve_cnn", "resnet18"]), default="deconvolve_cnn", show_default=True
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint file to write.")
@click.option(
    "--watermark",
    type=click.Choice(["none", "shortcut"]),
    default="none",
    show_default=True,
    help="'shortcut' trains the Clever Hans model on watermarked `shapes`.",
)
@click.option("--size", default=32, show_default=True, type=int, help="Image side in pixels.")
@click.option("--n-train", default=4000, show_default=True, type=int)
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option(
    "--lr",
    default=2e-3,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Adam learning rate (cosine-annealed over the epochs).",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--warmup",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Epochs of linear learning-rate warm-up.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--explainability-loss", is_flag=True, help="Add DeConvolve's explainability loss (Eq. 1).")
@click.option("--alpha", default=0.1, show_default=True, type=float, help="Weight of the active-area term.")
@click.option("--beta", default=0.05, show_default=True, type=float, help="Weight of the dispersion term.")
@click.option("--no-progress", is_flag=True)
def train(
    arch,
    out,
    watermark,
    size,
    n_train,
    epochs,
    lr,
    batch_size,
    warmup,
    seed,
    explainability_loss,
    alpha,
    beta,
    no_progress,
):
    """Train a reference model on the synthetic `shapes` data set and save a checkpoint."""
    from core.train import train_reference

    extra = None
    meta: dict[str, Any] = {}
    if explainability_loss:
        from core.explainability_loss import ExplainabilityLoss

        extra = ExplainabilityLoss(alpha=alpha, beta=beta)
        meta = {"explainability_loss": {"alpha": alpha, "beta": beta}}
    result = train_reference(
        arch,
        out,
        size=size,
        n_train=n_train,
        epochs=epochs,
        seed=seed,
        watermark=watermark,
        extra_loss=extra,
        progress=not no_progress,
        meta=meta,
        lr=lr,
        batch_size=batch_size,
        warmup=warmup,
    )
    click.echo(
        f"trained {arch} ({'Clever Hans' if watermark == 'shortcut' else 'clean'}): "
        f"held-out accuracy {result.accuracy:.1%}; saved {out}"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", "check_name", help="Run an explainer on a tiny model and validate its contract.")
def plugins(as_json, check_name):
    """List installed plugins: distribution, version and the names each provides."""
    host = _host()
    if check_name:
        try:
            from core.plugin_check import check_explainer
        except ModuleNotFoundError:
            raise XAIError("plugin checks are not available in this installation") from None
        report = check_explainer(check_name)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            for item in report["checks"]:
                click.echo(f"{'ok  ' if item['passed'] else 'FAIL'}  {item['name']}: {item['detail']}")
        sys.exit(0 if report["passed"] else 1)
    infos = host.plugins()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "distribution": i.distribution,
                        "version": i.version,
                        "provides": i.provides,
                        "error": i.error,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return
    for info in infos:
        click.echo(f"{info.name}  [{info.distribution} {info.version}]")
        for kind, names in sorted(info.provides.items()):
            click.echo(f"    {kind}s: {', '.join(sorted(names))}")
        if info.error:
            click.echo(f"    error: {info.error}")
    for name, err in host.load_errors.items():
        click.echo(f"warning: plugin {name} failed to load: {err}", err=True)


@cli.group()
def data() -> None:
    """Generate the synthetic data sets the project ships."""


@data.command("shapes")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--n", default=32, show_default=True, type=int)
@click.option("--size", default=32, show_default=True, type=int)
@click.option("--seed", default=1234, show_default=True, type=int)
@click.option(
    "--watermark", type=click.Choice(["none", "agree", "shortcut"]), default="agree", show_default=True
)
def data_shapes(out, n, size, seed, watermark):
    """Write `shapes` images (one folder per class) with masks/ and spurious/ ground truth."""
    from core.datasets import make_shapes
    from core.images import save_png

    ds = make_shapes(n, size=size, seed=seed, watermark=watermark)
    for i in range(n):
        cls = ds.class_names[int(ds.labels[i])]
        name = f"{cls}/{i:04d}.png"
        save_png(ds.images[i], out / "images" / name)
        save_png(ds.masks[i].float(), out / "masks" / name)
        save_png(ds.spurious[i].float(), out / "spurious" / name)
    click.echo(f"wrote {n} images with masks to {out}")


def build_cli() -> click.Group:
    """The root group with every plugin's commands added."""
    host = _host()
    for impl in host.hook.xai_register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as exc:
            click.echo(
                f"warning: plugin {host.pm.get_name(impl.plugin)} could not add its commands: {exc}", err=True
            )
    return cli


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and a non-zero exit, no traceback."""
    try:
        group = build_cli()
        group.main(args=argv, prog_name="xai", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except XAIError as exc:
        click.echo(f"error: {one_line(redact_text(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, still one line (XAI_DEBUG=1 shows the traceback)
        import os

        if os.environ.get("XAI_DEBUG"):
            raise
        text = one_line(redact_text(f"{type(exc).__name__}: {exc}"))[:500]
        click.echo(f"error: internal error, {text} (XAI_DEBUG=1 shows the traceback)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
