#!/usr/bin/env bash
# Seeds the fuzz corpus with small real files of every supported format (made by ffmpeg).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/probe_stem
for spec in "wav:" "flac:" "mp3:-c:a libmp3lame" "ogg:-c:a libvorbis" "m4a:-c:a aac" "alac.m4a:-c:a alac" "aiff:" "aac:-c:a aac -f adts"; do
  ext=${spec%%:*}; args=${spec#*:}
  # shellcheck disable=SC2086
  ffmpeg -nostdin -loglevel error -y -f lavfi -i "sine=f=440:r=22050:d=0.2" -ac 2 $args "corpus/probe_stem/seed.$ext"
done
