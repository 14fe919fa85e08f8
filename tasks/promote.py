"""Promote the packaged candidate to champion when the evaluate stage's gate said so.  Run: python -m tasks.promote

The package directory replaces evaluate.champion in one rename (the previous champion is kept beside it
as `<champion>.previous` for a rollback), and only if the package is the model the gate scored and the
champion is still the one it was compared with. When the gate kept the champion, nothing changes and the
reason is printed: "not promoted: test RMSE … vs champion … (…)".
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from tasks.files import sha256_file, write_json
from tasks.settings import Settings, UserError, cli


def promote(s: Settings) -> dict:
    from tasks.package import load_package

    gate_path = Path(s.evaluate.out_dir) / "gate.json"
    if not gate_path.exists():
        raise UserError(f"promote: {gate_path} does not exist; run the evaluate stage first")
    gate = json.loads(gate_path.read_text())
    champion = Path(s.evaluate.champion)
    if gate["decision"] != "promote":
        print(gate["message"])
        return {"promoted": False, "message": gate["message"], "champion": str(champion)}

    package = load_package(s.package.out_dir)  # every file checked
    evaluated = json.loads((Path(s.evaluate.out_dir) / "metrics.json").read_text())
    if package.manifest["metrics"].get(gate["primary"]) != evaluated.get(gate["primary"]):
        raise UserError(f"promote: {s.package.out_dir} is not the model the gate scored (its {gate['primary']} "
                        f"{package.manifest['metrics'].get(gate['primary'])} vs {evaluated.get(gate['primary'])}); rerun "
                        "the package stage")
    now = sha256_file(champion / "manifest.json") if (champion / "manifest.json").exists() else None
    was = (gate.get("champion") or {}).get("manifest_sha256")
    if now != was:
        raise UserError(f"promote: {champion} changed since the gate compared against it; rerun the evaluate stage")

    staged = champion.with_name(f".{champion.name}.promoting")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(s.package.out_dir, staged)
    write_json(staged / "promotion.json", {"promoted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                           "gate": {k: gate[k] for k in ("message", "primary", "candidate", "reference",
                                                                         "improvement", "against")}})
    if champion.exists():  # the previous champion stays beside it, for a rollback
        previous = champion.with_name(f"{champion.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(champion, previous)
    os.replace(staged, champion)  # a complete package, or the previous one: never a half-copied directory
    message = gate["message"].replace("promote:", "promoted:", 1)
    print(message)
    return {"promoted": True, "message": message, "champion": str(champion)}


if __name__ == "__main__":
    cli(promote)
