// The chart, written by hand (no charting dependency), as small multiples: one row per measure (2xx responses per
// second, failures per second), one column per contender, every panel of a row on the same scale and every panel on
// the same time axis, each contender's reload windows shaded behind its lines. One line per panel: no contender
// hides another. The failures row is on a log scale, so a handful of failed requests is as visible as thousands.
import type { ContenderResult } from './sections/reloads';

export const COLORS: Record<string, string> = {
  'aeterna-immediate': '#1b9e77',
  'aeterna-canary': '#7570b3',
  naive: '#d95f02',
  pm2: '#e7298a',
};
const FALLBACK = ['#66a61e', '#e6ab02', '#a6761d', '#666666'];

export function colorOf(id: string, i: number): string {
  return COLORS[id] ?? FALLBACK[i % FALLBACK.length];
}

export function escapeXml(s: string): string {
  return s
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&apos;');
}

/** A step of 1, 2 or 5 times a power of ten giving about `count` ticks up to max. */
export function niceStep(max: number, count: number): number {
  if (!(max > 0)) return 1;
  const raw = max / count;
  const pow = 10 ** Math.floor(Math.log10(raw));
  const m = raw / pow;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * pow;
}

function siLabel(v: number): string {
  if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return String(+v.toFixed(2));
}

const f1 = (v: number): string => (Math.round(v * 10) / 10).toString();

export interface ChartOptions {
  title: string;
  subtitle?: string;
}

/** The measures, one row of panels each. */
const MEASURES: Array<{
  title: string;
  values: (c: ContenderResult) => number[];
  log: boolean;
}> = [
  { title: '2xx responses per second', values: (c) => c.timeline.okPerS, log: false },
  {
    title: 'failures per second (log scale): refused, reset, timeout, non-2xx',
    values: (c) => c.timeline.failedPerS,
    log: true,
  },
];

export function renderChart(contenders: ContenderResult[], options: ChartOptions): string {
  const runs = contenders.filter((c) => c.error === null && c.timeline.okPerS.length > 0);
  const W = 1000;
  const left = 60;
  const right = 20;
  const gap = 16;
  const columns = Math.max(1, runs.length);
  const panelW = (W - left - right - gap * (columns - 1)) / columns;
  const panelH = 150;
  const rowGap = 58;
  const top = 104;
  const H = top + MEASURES.length * (panelH + rowGap) + 10;

  const maxS = Math.max(1, ...runs.map((c) => c.durationMs / 1000));
  const stepX = niceStep(maxS, Math.max(2, Math.round(8 / columns)));

  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
  );
  out.push(`<title>${escapeXml(options.title)}</title>`);
  out.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${left}" y="22" font-size="16" font-weight="bold">${escapeXml(options.title)}</text>`);
  if (options.subtitle) out.push(`<text x="${left}" y="40" fill="#555555">${escapeXml(options.subtitle)}</text>`);
  out.push(
    `<text x="${left}" y="60" fill="#555555">seconds since the load started on the x axes (each contender runs on its own, one after the other); shaded: its reloads, request to done</text>`,
  );

  MEASURES.forEach((measure, row) => {
    const y0 = top + row * (panelH + rowGap);
    out.push(`<text x="${left}" y="${y0 - 26}" font-weight="bold">${escapeXml(measure.title)}</text>`);
    // One scale for the row: the panels compare.
    const max = Math.max(1, ...runs.flatMap((c) => measure.values(c)));
    const decades = Math.max(1, Math.ceil(Math.log10(max + 1)));
    const step = niceStep(max * 1.05, 4);
    const topV = Math.ceil((max * 1.05) / step) * step;
    const y = (v: number): number =>
      measure.log ? y0 + panelH - (Math.log10(1 + v) / decades) * panelH : y0 + panelH - (v / topV) * panelH;
    const ticks = measure.log
      ? Array.from({ length: decades + 1 }, (_, d) => (d === 0 ? 0 : 10 ** d))
      : Array.from({ length: Math.round(topV / step) + 1 }, (_, k) => k * step);
    runs.forEach((c, col) => {
      const x0 = left + col * (panelW + gap);
      const x = (sec: number): number => x0 + (sec / maxS) * panelW;
      const color = colorOf(c.id, col);
      if (row === 0) {
        const head = `${c.label}: ${c.failed.toLocaleString('en-US')} failed`;
        out.push(`<text x="${f1(x0)}" y="${y0 - 10}" fill="${color}" font-weight="bold">${escapeXml(head)}</text>`);
      } else {
        out.push(`<text x="${f1(x0)}" y="${y0 - 10}" fill="${color}">${escapeXml(c.label)}</text>`);
      }
      for (const [a, b] of c.windows) {
        const xa = x(a / 1000);
        const w = Math.max(1.5, x(b / 1000) - xa);
        out.push(
          `<rect x="${f1(xa)}" y="${y0}" width="${f1(w)}" height="${panelH}" fill="${color}" fill-opacity="0.12"/>`,
        );
      }
      for (const v of ticks) {
        out.push(`<line x1="${f1(x0)}" y1="${f1(y(v))}" x2="${f1(x0 + panelW)}" y2="${f1(y(v))}" stroke="#e5e5e5"/>`);
        if (col === 0)
          out.push(`<text x="${left - 6}" y="${f1(y(v) + 4)}" text-anchor="end" fill="#555555">${siLabel(v)}</text>`);
      }
      for (let sec = 0; sec <= maxS + 1e-9; sec += stepX)
        out.push(
          `<text x="${f1(x(sec))}" y="${y0 + panelH + 14}" text-anchor="middle" font-size="10" fill="#555555">${siLabel(sec)}</text>`,
        );
      out.push(`<rect x="${f1(x0)}" y="${y0}" width="${f1(panelW)}" height="${panelH}" fill="none" stroke="#999999"/>`);
      const b = c.timeline.bucketMs / 1000;
      const pts = measure
        .values(c)
        .map((v, k) => `${f1(x((k + 0.5) * b))},${f1(y(v))}`)
        .join(' ');
      out.push(`<polyline fill="none" stroke="${color}" stroke-width="1.4" stroke-linejoin="round" points="${pts}"/>`);
    });
  });
  if (runs.length === 0)
    out.push(`<text x="${W / 2}" y="${top + panelH / 2}" text-anchor="middle">no contender completed a run</text>`);
  out.push('</svg>');
  return out.join('\n') + '\n';
}
