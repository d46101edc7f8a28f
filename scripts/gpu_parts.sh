# Sourced by GPU scripts: `part NAME LIMIT CMD...` runs one part with its output in $S/NAME.txt, a line in
# $S/summary.txt, and a time limit cut to what is left of $DEADLINE (seconds since the script started); the
# Triton cache's restore and save let a fresh machine start with the kernels an earlier one compiled.
part() { local name=$1 limit=$2; shift 2; local s=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "== $name: skipped, past the deadline" | tee -a "$S/summary.txt"; return 1; fi
  timeout "$limit" "$@" > "$S/$name.txt" 2>&1; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - s)) s" | tee -a "$S/summary.txt"; return $rc; }

# TRITON_CACHE_DIR restored from .triton_carry/triton.tgz.* (carried to the device machine) where those exist
restore_triton_cache() { export TRITON_CACHE_DIR=/tmp/triton_cache; mkdir -p "$TRITON_CACHE_DIR"
  ls .triton_carry/triton.tgz.* >/dev/null 2>&1 && cat .triton_carry/triton.tgz.* | tar xz -C "$TRITON_CACHE_DIR" \
    && echo "== Triton cache restored: $(du -sh "$TRITON_CACHE_DIR" | cut -f1)" | tee -a "$S/summary.txt"; }

# ... and saved to $1 in parts of 15 MB (the device tool returns files of up to 16 MiB)
save_triton_cache() { tar cz -C "$TRITON_CACHE_DIR" . | split -b 15M -d - "$1/triton.tgz."
  echo "== Triton cache saved: $(du -sh "$TRITON_CACHE_DIR" | cut -f1), $(ls "$1"/triton.tgz.* | wc -l) parts" \
    >> "$S/summary.txt"; }
