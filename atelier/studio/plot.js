// A hand-drawn SVG line plot: linear axes with "nice" ticks, one polyline per series, a legend.
//   linePlot([{name: "train loss", className: "s-train", points: [[step, loss], …]}, …],
//            {xLabel: "step", yLabel: "loss"}) → <svg>

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  el.append(...children);
  return el;
}

/** About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k). */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    [lo, hi] = [lo - pad, hi + pad];
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  if (ticks[ticks.length - 1] < hi) ticks.push(+(ticks[ticks.length - 1] + step).toPrecision(12));
  return ticks;
}

const fmt = (v) => (Math.abs(v) >= 1000 ? v.toLocaleString("en") : String(+v.toPrecision(4)));

export function linePlot(series, { width = 640, height = 280, xLabel = "", yLabel = "" } = {}) {
  const m = { top: 16, right: 16, bottom: 40, left: 56 };
  const W = width - m.left - m.right;
  const H = height - m.top - m.bottom;
  const all = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "plot", role: "img",
                            "aria-label": `${yLabel} against ${xLabel}` });
  if (!all.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "plot-empty", "text-anchor": "middle" },
                    "no metrics yet"));
    return root;
  }
  const xs = niceTicks(Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0])));
  const ys = niceTicks(Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1])));
  const [x0, x1, y0, y1] = [xs[0], xs[xs.length - 1], ys[0], ys[ys.length - 1]];
  const X = (v) => m.left + ((v - x0) / (x1 - x0 || 1)) * W;
  const Y = (v) => m.top + H - ((v - y0) / (y1 - y0 || 1)) * H;

  // 1. grid and axes
  const grid = svg("g", { class: "plot-grid" });
  for (const t of ys) {
    grid.append(svg("line", { x1: m.left, x2: m.left + W, y1: Y(t), y2: Y(t) }),
                svg("text", { x: m.left - 8, y: Y(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  for (const t of xs) {
    grid.append(svg("line", { x1: X(t), x2: X(t), y1: m.top, y2: m.top + H, class: "v" }),
                svg("text", { x: X(t), y: m.top + H + 18, "text-anchor": "middle" }, fmt(t)));
  }
  grid.append(svg("text", { x: m.left + W / 2, y: height - 4, "text-anchor": "middle", class: "plot-label" }, xLabel),
              svg("text", { x: 14, y: m.top + H / 2, "text-anchor": "middle", class: "plot-label",
                            transform: `rotate(-90 14 ${m.top + H / 2})` }, yLabel));
  root.append(grid);

  // 2. one polyline per series (dots where points are sparse), sorted by x
  series.forEach((s, i) => {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const g = svg("g", { class: `plot-series ${s.className ?? `s-${i}`}`, "data-name": s.name,
                         "data-points": String(pts.length) });
    g.append(svg("polyline", { points: pts.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ") }));
    if (pts.length <= 40) for (const [x, y] of pts) g.append(svg("circle", { cx: X(x), cy: Y(y), r: 3 }));
    root.append(g);
  });

  // 3. legend, top right
  const legend = svg("g", { class: "plot-legend" });
  series.forEach((s, i) => {
    const y = m.top + 8 + i * 18;
    legend.append(svg("line", { x1: m.left + W - 120, x2: m.left + W - 100, y1: y, y2: y,
                                class: `swatch ${s.className ?? `s-${i}`}` }),
                  svg("text", { x: m.left + W - 94, y: y + 4 }, `${s.name} (${s.points.length})`));
  });
  root.append(legend);
  return root;
}
