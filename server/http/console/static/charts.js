// Draws the console's charts with the vendored Chart.js from the JSON each page embeds in
// <script type="application/json" id="chart-data"> (data, never code: the CSP runs no inline script).
"use strict";
(function () {
  const palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

  function canvasIn(parent, title) {
    const heading = document.createElement("h3");
    heading.textContent = title;
    const box = document.createElement("div");
    box.className = "chart";
    const canvas = document.createElement("canvas");
    box.append(canvas);
    parent.append(heading, box);
    return canvas;
  }

  function budgetChart(canvas, chart) {
    // One category per charge time; each budget's spending steps up, its cap is a dashed level line.
    const times = new Set(chart.lines.flatMap((l) => l.points.map((p) => p.x)));
    times.delete("before");
    const labels = ["before", ...[...times].sort()];
    const datasets = [];
    chart.lines.forEach((line, i) => {
      const colour = palette[i % palette.length];
      datasets.push({ label: line.label, data: line.points, stepped: true, spanGaps: true, borderColor: colour,
                      backgroundColor: colour });
      if (line.cap !== null) {
        datasets.push({ label: `cap of ${line.label}`, data: labels.map(() => line.cap), borderDash: [6, 4],
                        borderColor: colour, pointRadius: 0, fill: false });
      }
    });
    return new Chart(canvas, { type: "line", data: { labels, datasets },
      options: { animation: false, maintainAspectRatio: false,
                 scales: { y: { beginAtZero: true, title: { display: true, text: `${chart.unit} spent` } } } } });
  }

  function refusalChart(canvas, data) {
    return new Chart(canvas, { type: "bar", data: { labels: data.labels,
      datasets: data.series.map((s, i) => ({ label: s.label, data: s.values, backgroundColor: palette[i % palette.length] })) },
      options: { animation: false, maintainAspectRatio: false, scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } } });
  }

  function intervalChart(canvas, data) {
    // Chart.js with chartjs-chart-error-bars: a bar per cell, its 95% interval as an error bar.
    Chart.register(ChartErrorBars.BarWithErrorBarsController, ChartErrorBars.BarWithErrorBar);
    return new Chart(canvas, { type: "barWithErrorBars",
      data: { labels: data.points.map((p) => p.label),
              datasets: [{ label: `${data.measure} (95% interval)`, backgroundColor: "#9ecae1",
                           data: data.points.map((p) => ({ y: p.y, yMin: p.yMin, yMax: p.yMax })) }] },
      options: { animation: false, maintainAspectRatio: false } });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const source = document.getElementById("chart-data");
    if (!source) return;
    const data = JSON.parse(source.textContent);
    const drawn = [];
    const budgets = document.getElementById("budget-charts");
    if (budgets && data.budgets) {
      for (const chart of data.budgets) drawn.push(budgetChart(canvasIn(budgets, `${chart.dataset}: ${chart.scope} budgets`), chart));
    }
    const refusals = document.getElementById("refusal-chart");
    if (refusals && data.refusals) drawn.push(refusalChart(refusals, data.refusals));
    const intervals = document.getElementById("interval-chart");
    if (intervals && data.intervals) drawn.push(intervalChart(intervals, data.intervals));
    document.body.dataset.charts = String(drawn.length);  // for tests: how many charts were drawn
  });
})();
