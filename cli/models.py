"""`medplib experts`, `info`, `convert` and `quantize`: what is installed and what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import typer

from medplib.cli.common import app, user_errors


@app.command()
@user_errors
def experts(
    as_json: bool = typer.Option(False, "--json", help="print the experts and plugin problems as JSON"),
) -> None:
    """List the registered experts (built-in and from installed plugins); report plugins that failed."""
    import json

    from medplib.core.plugins import get_experts, plugin_problems

    specs, problems = list(get_experts().values()), plugin_problems()
    if as_json:
        payload = {
            "experts": [spec.model_dump(mode="json") for spec in specs],
            "problems": [{"plugin": p.plugin, "source": p.source, "reason": p.reason} for p in problems],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    rows = [("name", "version", "capabilities", "source")]
    rows += [(s.name, s.version, ", ".join(s.capabilities), s.source) for s in specs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        padded = (cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        typer.echo("  ".join([*padded, row[3]]))
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)


convert_app = typer.Typer(help="Convert foreign checkpoints into medplib checkpoints.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("medplib")
@user_errors
def convert_medplib(
    source: Path = typer.Argument(..., help="MedPLIB's released checkpoint folder (e.g. MedPLIB-7b-2e)"),
    out: Path = typer.Argument(..., help="new folder for the converted checkpoint"),
    dtype: str = typer.Option("keep", "--dtype", help="keep, bfloat16 or float32 (gates stay float32)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard, e.g. 5GB or 500MB"),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="MedPLIB's tokenizer folder (default: SOURCE)"
    ),
    vision_tower: Path | None = typer.Option(
        None, "--vision-tower", help="CLIP tower folder (default: the config's)"
    ),
    sam_decoder_heads: int = typer.Option(
        8, "--sam-decoder-heads", help="SAM mask decoder heads (MedPLIB: 8)"
    ),
    experts: str = typer.Option(
        "dense", "--experts", help="dense (exact), or lora: shared MLP + rank-R deltas"
    ),
    rank: int | None = typer.Option(None, "--rank", help="rank R of each expert's delta with --experts lora"),
) -> None:
    """Convert MedPLIB's released checkpoint, shard by shard, into a medplib checkpoint (compat: medplib)."""
    from medplib.router.convert_medplib import convert_medplib as convert
    from medplib.router.convert_medplib import parse_dtype, parse_size

    report = convert(
        source,
        out,
        dtype=parse_dtype(dtype),
        shard_size=parse_size(shard_size),
        tokenizer=tokenizer,
        vision_tower=vision_tower,
        sam_decoder_heads=sam_decoder_heads,
        experts=experts,
        rank=rank,
    )
    if report.factorization_error:
        worst = max(report.factorization_error, key=report.factorization_error.get)
        typer.echo(
            f"rank-{rank} experts: largest relative error {report.factorization_error[worst]:.4f} ({worst})"
        )
    dropped, gigabytes = len(report.dropped_keys), report.bytes_written / 1e9
    typer.echo(
        f"converted {report.source_keys} keys ({dropped} dropped) into {report.written_keys} tensors, "
        f"{gigabytes:.3f} GB in {len(report.shards)} shard(s), {report.seconds:.1f} s: {out}"
    )


@app.command()
@user_errors
def quantize(
    model: str = typer.Argument(..., help="preset, checkpoint folder or stage II / III folder"),
    out: Path = typer.Argument(..., help="new folder for the quantised checkpoint"),
    mode: str = typer.Option("int8", "--mode", help="int8 or int4: the LLM's and CLIP's linear layers"),
) -> None:
    """Write a quantised checkpoint (CPU) that `medplib.load(OUT)` and every command load as saved."""
    import medplib
    from medplib.core.model.quantized_checkpoint import save_quantized

    names = save_quantized(medplib.load(model, device="cpu").model, out, mode)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    typer.echo(f"{len(names)} linear layers at {mode}, {size:.1f} MB: {out}")


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help="preset (tiny, small, medplib-7b), checkpoint or fsspec URI"),
    as_json: bool = typer.Option(False, "--json", help="print the model's description as JSON"),
    dtype: str = typer.Option("float32", "--dtype", help="weights' dtype for the bytes column"),
    quantization: str | None = typer.Option(None, "--quantization", help="int8 or int4, for the bytes"),
) -> None:
    """Describe a model without loading its weights: components, parameters and bytes, tokens, experts."""
    from medplib.core.model_info import format_info
    from medplib.loading import model_info

    described = model_info(model, dtype=dtype, quantization=quantization)
    typer.echo(described.model_dump_json(indent=2) if as_json else format_info(described))
