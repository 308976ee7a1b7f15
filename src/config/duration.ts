// Durations as written in aeterna.yaml and on the command line: whole numbers
// with units h, m, s, ms, largest unit first ("500ms", "10s", "1m30s", "2h").
// No fractions, no sign, no bare numbers: "30" could mean seconds or
// milliseconds, and a config must not be read two ways.

const UNIT_MS = { h: 3_600_000, m: 60_000, s: 1_000, ms: 1 } as const;

/**
 * The accepted form as an ECMA-262 regular expression, shared with the JSON
 * Schema. Backtracking keeps "500ms" from being read as "500m" + "s".
 */
export const DURATION_PATTERN = '^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$';
const DURATION_RE = new RegExp(DURATION_PATTERN);

/** How the form is described in error messages. */
export const DURATION_FORM =
  'a duration: whole numbers with units h, m, s or ms, largest first, e.g. "500ms", "10s", "1m30s", "2h"';

/** Milliseconds, or null when `text` is not a duration. */
export function parseDuration(text: string): number | null {
  const match = DURATION_RE.exec(text);
  if (text === '' || match === null) return null;
  const [, h, m, s, ms] = match;
  let total = 0;
  for (const [part, unit] of [
    [h, 'h'],
    [m, 'm'],
    [s, 's'],
    [ms, 'ms'],
  ] as const) {
    if (part !== undefined) total += Number(part.slice(0, -unit.length)) * UNIT_MS[unit];
  }
  return Number.isSafeInteger(total) ? total : null;
}

/** The shortest form parseDuration reads back as `ms` (rounded to whole ms). */
export function formatDuration(ms: number): string {
  let rest = Math.max(0, Math.round(ms));
  if (rest === 0) return '0s';
  let text = '';
  for (const unit of ['h', 'm', 's', 'ms'] as const) {
    const count = Math.floor(rest / UNIT_MS[unit]);
    if (count > 0) text += `${count}${unit}`;
    rest -= count * UNIT_MS[unit];
  }
  return text;
}
