// Runs once per page load, in the browser (gr.Blocks.load(js=...)).
// 1. The progress line's clocks (`<span class="crma-tick">`, see LiveView.progress_html) advance every second, so
//    the elapsed time keeps moving through a long set-up or step, between two server updates.
// 2. Zoom, pan and legend clicks survive live updates. Gradio 6.31's Plot re-creates the chart element whenever its
//    figure changes (a `{#key}` block in Plot.svelte around PlotlyPlot), so Plotly's `uirevision` memory, which lives
//    on the element, is lost each time. The visitor's axis ranges and hidden traces are recorded per chart from
//    Plotly's own `plotly_relayout` / `plotly_restyle` events and applied to the next figure inside `Plotly.react`,
//    as long as its `uirevision` is the same (one run); a new run, or an axis changing type (log scale), starts
//    afresh, as in Plotly. Gradio's Plotly chunk sets `window.Plotly` when it loads: the wrapper goes on then.
() => {
  if (window.__crmaPage) return;
  window.__crmaPage = true;
  const clock = (s) => {
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), two = (x) => String(x).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(s % 60)}` : `${m}:${two(s % 60)}`;
  };
  setInterval(() => {
    for (const el of document.querySelectorAll(".crma-tick")) {
      if (!el.dataset.seen) el.dataset.seen = String(performance.now());
      const dt = (performance.now() - Number(el.dataset.seen)) / 1000;
      el.textContent = clock(Number(el.dataset.s) + (el.dataset.dir === "down" ? -dt : dt));
    }
  }, 1000);
  const views = {};
  const keyOf = (gd) => gd && gd.closest && gd.closest(".block[id]")?.id;
  const record = (gd) => {
    const key = keyOf(gd), full = gd._fullLayout;
    if (!key || !gd.layout || !full) return;
    const axes = {}, hidden = {};
    for (const name of Object.keys(gd.layout)) {
      const ax = gd.layout[name];
      if (/^[xy]axis[0-9]*$/.test(name) && ax && ax.autorange === false && Array.isArray(ax.range))
        axes[name] = { range: ax.range.slice(), type: full[name] && full[name].type };
    }
    for (const t of gd.data || [])
      if (t.name && t.visible !== undefined && t.visible !== true) hidden[t.name] = t.visible;
    views[key] = { rev: gd.layout.uirevision, axes, hidden };
  };
  const wrap = (P) => {
    if (!P || P.__crmaKeepsView) return;
    P.__crmaKeepsView = true;
    const react = P.react;
    P.react = function (gd, data, layout, config) {
      const key = keyOf(gd), view = key && views[key];
      if (view && layout && Array.isArray(data) && view.rev === layout.uirevision) {
        for (const [name, ax] of Object.entries(view.axes)) {
          const type = (layout[name] && layout[name].type) || "linear";
          if (type === ax.type || (ax.type === "linear" && type === "-"))
            layout[name] = Object.assign({}, layout[name], { range: ax.range.slice(), autorange: false });
        }
        for (const t of data) if (t.name in view.hidden) t.visible = view.hidden[t.name];
      }
      const drawn = react.apply(this, arguments);
      if (key && !gd.__crmaWatched) {
        gd.__crmaWatched = true;
        Promise.resolve(drawn).then(() => {
          gd.on("plotly_relayout", () => record(gd));
          gd.on("plotly_restyle", () => record(gd));
        });
      }
      return drawn;
    };
  };
  if (window.Plotly) wrap(window.Plotly);
  else {
    let plotly;
    Object.defineProperty(window, "Plotly", {
      configurable: true, enumerable: true, get: () => plotly, set: (v) => { plotly = v; wrap(v); },
    });
  }
}
