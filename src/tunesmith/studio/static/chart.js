// tunesmith studio: a small line chart on a canvas (no library, nothing fetched).  Several named series, each
// a list of [x, y] points; points are added as they arrive and the chart redraws itself.
"use strict";
class LineChart {
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.series = new Map();
    this.colors = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
    this.logY = !!options.logY;
    this.pending = false;
  }
  add(name, x, y) {
    if (y === null || y === undefined || !isFinite(y)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    this.series.get(name).push([x, y]);
    this.schedule();
  }
  clear() { this.series.clear(); this.schedule(); }
  count(name) { return (this.series.get(name) || []).length; }
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }
  bounds() {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const points of this.series.values()) for (const [x, y] of points) {
      x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
    }
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const pad = (y1 - y0) * 0.05;
    return [x0, x1, y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad, y1 + pad];
  }
  static label(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(2);
    return Number(v.toPrecision(4)).toString();
  }
  draw() {
    const c = this.canvas, g = c.getContext("2d"), w = c.width, h = c.height;
    const left = 56, right = 12, top = 10, bottom = 26;
    g.clearRect(0, 0, w, h);
    g.font = "11px sans-serif";
    g.fillStyle = "#6b7280";
    if (this.series.size === 0) { g.fillText("no points yet", left + 10, h / 2); return; }
    const [x0, x1, y0, y1] = this.bounds();
    const px = x => left + (x - x0) / (x1 - x0) * (w - left - right);
    const py = y => top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom);
    g.strokeStyle = "#e5e7eb";
    for (let i = 0; i <= 4; i++) {
      const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
      g.beginPath(); g.moveTo(left, py(y)); g.lineTo(w - right, py(y)); g.stroke();
      g.fillText(LineChart.label(y), 2, py(y) + 4);
      g.fillText(LineChart.label(x1 - x0 >= 8 ? Math.round(x) : Math.round(x * 100) / 100), px(x) - 8, h - 8);
    }
    let i = 0;
    for (const [name, points] of this.series) {
      const color = this.colors[i % this.colors.length];
      g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.6;
      g.beginPath();
      points.forEach(([x, y], k) => k ? g.lineTo(px(x), py(y)) : g.moveTo(px(x), py(y)));
      g.stroke();
      if (points.length < 40) for (const [x, y] of points) g.fillRect(px(x) - 1.5, py(y) - 1.5, 3, 3);
      g.fillText(name, w - right - 150, top + 12 + 13 * i);
      i++;
    }
    this.canvas.dataset.points = [...this.series.values()].reduce((n, p) => n + p.length, 0);
  }
}
window.LineChart = LineChart;
