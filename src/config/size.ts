// Byte sizes as written in aeterna.yaml: a whole number of bytes, or a whole
// number with a binary unit ("512KiB", "16MiB"). Decimal units (MB) are not
// accepted: 16MB vs 16MiB is exactly the ambiguity a limit must not have.

const UNIT_BYTES = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3 } as const;
type SizeUnit = keyof typeof UNIT_BYTES;

export const SIZE_PATTERN = '^[0-9]+(B|KiB|MiB|GiB)?$';
const SIZE_RE = new RegExp(SIZE_PATTERN);

export const SIZE_FORM = 'a size: a whole number of bytes, or one with unit B, KiB, MiB or GiB, e.g. "16MiB"';

/** Bytes, or null when `value` is neither a non-negative integer nor a size string. */
export function parseSize(value: string | number): number | null {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? value : null;
  const match = SIZE_RE.exec(value);
  if (match === null) return null;
  const unit = (match[1] ?? 'B') as SizeUnit;
  const bytes = Number(value.slice(0, value.length - (match[1]?.length ?? 0))) * UNIT_BYTES[unit];
  return Number.isSafeInteger(bytes) ? bytes : null;
}

/** The largest exact unit: 16777216 -> "16MiB", 1500 -> "1500B". */
export function formatSize(bytes: number): string {
  for (const unit of ['GiB', 'MiB', 'KiB'] as const) {
    if (bytes > 0 && bytes % UNIT_BYTES[unit] === 0) return `${bytes / UNIT_BYTES[unit]}${unit}`;
  }
  return `${bytes}B`;
}
