#!/usr/bin/env bash
# Get the working tree ready for a lent-GPU call, and put it back afterwards.
#
#   scripts/lease.sh prepare    # right before the first device call
#   scripts/lease.sh restore    # right after the last one (and after unpacking what came back)
#
# Why: a call sends the tracked files (~52 MiB, most of it model weights and eval JSON) plus
# what `carry` names, 64 MiB in all, and generator training needs the Fashion-MNIST training
# set (25 MiB gzip). `prepare`:
#   - takes the files a lease does not need out of the index and the tree (the encoders, which
#     call 1 retrains, and docs/: with docs/results alone held it came to 63.4 MiB on
#     2026-11-27, 62 with docs/), keeping them in $HOLD until `restore`;
#   - snapshots the committed package and scripts into .lease/ (git-ignored), so the device
#     runs the code as committed, not another agent's half-made edit, with links to data/,
#     models/ and runs/;
#   - puts the data sets into data/<name>/ (git-ignored), Fashion-MNIST's training images as xz.
# WARM_MNIST=DIR / WARM_FASHION_MNIST=DIR (optional): the lease continues that data set from another
# export, e.g. a run continued on the CPU (`train-gan --export-only --out DIR`), instead of the shipped
# one: DIR's generator, critic and card stand in for models/<ds>'s during the lease (the same size, so
# the 64 MiB hold); `restore` puts the shipped ones back unless the lease's own export was unpacked
# over them.
#   - copies the held encoders to .lease-enc/ (git-ignored), for call 2's serving check.
# Then, in the device call: carry [".lease", "data"] and run
#   mkdir -p runs && cd .lease && OUT=$OUT bash scripts/gpu_train.sh     (call 1)
#   cd .lease && OUT=$OUT bash scripts/gpu_eval.sh                       (call 2, same warm machine;
#   carry [".lease", ".whl", ".lease-enc"] when it runs scripts/gpu_serve.sh too)
# Between calls the tree must stay as `prepare` left it. See docs/DEVELOPING.md, "A lent GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
HOLD=${HOLD:-/tmp/purifier-lease-hold}
HELD=(models/mnist/encoder.safetensors models/fashion-mnist/encoder.safetensors docs)
PY=${PY:-.venv/bin/python}

case "${1:-}" in
prepare)
  [ -e "$HOLD/held.tar" ] && { echo "already prepared ($HOLD/held.tar exists); restore first" >&2; exit 1; }
  mkdir -p "$HOLD"
  SWAP=() FROM=()  # models/<ds>/{generator,critic,card} and the WARM_<DS> files that stand in for them
  for ds in mnist fashion-mnist; do
    var=WARM_$(echo "$ds" | tr 'a-z-' 'A-Z_'); src=${!var:-}
    [ -z "$src" ] && continue
    for f in generator.safetensors critic.safetensors card.json; do
      [ -f "$src/$f" ] || { echo "$var=$src has no $f (train-gan --export-only --out $src writes all three)" >&2; exit 1; }
      SWAP+=("models/$ds/$f") FROM+=("$src/$f")
    done
  done
  tar -cf "$HOLD/held.tar" "${HELD[@]}" "${SWAP[@]}"
  # the encoders again, for call 2 only (carry .lease-enc; 12 MiB): gpu_serve.sh serves a model with one
  rm -rf .lease-enc && for ds in mnist fashion-mnist; do
    mkdir -p .lease-enc/$ds && cp models/$ds/encoder.safetensors .lease-enc/$ds/; done
  grep -qx '/.lease-enc/' .git/info/exclude 2>/dev/null || echo '/.lease-enc/' >> .git/info/exclude
  git rm -r -q --cached "${HELD[@]}"
  rm -rf "${HELD[@]}"
  : > "$HOLD/swapped.sha256"
  for i in "${!SWAP[@]}"; do
    cp "${FROM[$i]}" "${SWAP[$i]}" && sha256sum "${SWAP[$i]}" >> "$HOLD/swapped.sha256"
    echo "warm start: ${SWAP[$i]} from ${FROM[$i]}"
  done
  grep -qx '/.lease/' .git/info/exclude 2>/dev/null || echo '/.lease/' >> .git/info/exclude
  rm -rf .lease && mkdir .lease
  git archive HEAD purifier scripts tests pyproject.toml | tar -x -C .lease
  ln -s ../data .lease/data && ln -s ../models .lease/models && ln -s ../runs .lease/runs
  mkdir -p data/mnist data/fashion-mnist runs
  $PY - <<'EOF'
import gzip, lzma, shutil
from pathlib import Path
from purifier import data
for name in ("mnist", "fashion-mnist"):
    dest = Path("data") / name
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = data._find(name, stem, [d for d in data.candidate_dirs(name) if d.resolve() != dest.resolve()])
        if src is None:
            raise SystemExit(f"{name}: {stem} not found; see README, 'Data'")
        big = name == "fashion-mnist" and stem.startswith("train-images")
        out = dest / (stem + (".xz" if big else src.name[len(stem):]))
        if out.exists():
            continue
        if big:  # xz -9: 21.6 MiB instead of gzip's 25.2
            raw = src.read_bytes()
            out.write_bytes(lzma.compress(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, preset=9))
        else:
            shutil.copyfile(src, out)
        print("data:", out)
EOF
  tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
  other=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  carried=$(du -sb data .lease | awk '{s+=$1} END {print s}')
  echo "travels: tracked $((tracked / 1048576)) MiB + untracked $((other / 1048576)) MiB + carried $((carried / 1048576)) MiB" \
       "= $(((tracked + other + carried) / 1048576)) MiB (limit 64)"
  ;;
restore)
  [ -e "$HOLD/held.tar" ] || { echo "nothing held in $HOLD" >&2; exit 1; }
  # a stand-in the lease's export did not replace goes; the shipped file comes back from the tar
  [ -f "$HOLD/swapped.sha256" ] && while read -r sum f; do
    if [ "$(sha256sum "$f" 2>/dev/null | cut -d' ' -f1)" = "$sum" ]; then rm -f "$f"
    else echo "kept $f: the lease's export replaced the warm-start stand-in"; fi
  done < "$HOLD/swapped.sha256"
  tar -xf "$HOLD/held.tar" --skip-old-files
  git reset -q HEAD -- "${HELD[@]}"
  rm -f "$HOLD/held.tar" "$HOLD/swapped.sha256"
  rm -rf .lease-enc
  git status --short -- "${HELD[@]}"
  ;;
*)
  echo "usage: scripts/lease.sh prepare|restore" >&2; exit 2 ;;
esac
