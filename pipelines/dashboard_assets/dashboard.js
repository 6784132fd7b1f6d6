/* actstore latent dashboard: draws index.html (every latent of one SAE) and latent.html?i=N
   (one latent) from data scripts that call the globals below:
     data/index.js          actstoreIndex({title, d_sae, tokens, frequency, mean, max, ...});
     data/latents-KKKKK.js  actstoreLatents(K, [record, ...]);   (latents K*shard_size ...)
   Data arrives by <script> tags, never fetch, so the pages work from file:// and any static
   server. Plain ES2017, no dependencies. */
"use strict";

(function () {
  const page = document.body.dataset.page;
  const $ = (sel) => document.querySelector(sel);
  const shards = {};
  let INDEX = null;
  let current = null; // latent shown on latent.html

  // ---------- formatting ----------
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
  function fmtNum(x) {
    if (!x) return "0";
    const a = Math.abs(x);
    if (a >= 1000) return fmtInt(x);
    return a >= 0.01 ? String(+x.toPrecision(3)) : x.toExponential(1);
  }
  function fmtFreq(f) { // a fraction, shown as percent (scientific when tiny)
    if (!f) return "0%";
    const p = f * 100;
    return p >= 0.01 ? `${+p.toPrecision(3)}%` : `${p.toExponential(1)}%`;
  }
  const SUP = "⁰¹²³⁴⁵⁶⁷⁸⁹";
  const pow10 = (k) => (k === 0 ? "1" : k === 1 ? "10"
    : "10" + String(k).replace(/./g, (c) => (c === "-" ? "⁻" : SUP[c])));
  // whitespace made visible: newline and tab get a glyph, spaces stay (CSS white-space: pre-wrap)
  const showTok = (t) => String(t).replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥");

  function showError(msg) {
    const el = $("#error");
    el.textContent = msg;
    el.hidden = false;
    document.body.dataset.state = "error";
    for (const id of ["#loading", "#content"]) if ($(id)) $(id).hidden = true;
  }
  window.actstoreMissing = (path) =>
    showError(`Could not load ${path}: the dashboard's data files are missing or unreadable.`);
  window.addEventListener("load", () => {
    if (!INDEX && document.body.dataset.state === "loading") {
      showError("No dashboard data: data/index.js is missing or did not call actstoreIndex().");
    }
  });

  // ---------- SVG histogram, x in log10 units over whole decades lo..hi ----------
  function chart(el, bars, lo, hi, xLabel, marker, H = 190) {
    const W = Math.max(320, el.clientWidth || 720), L = 52, R = 14, T = 10, B = 38;
    const ymax = Math.max(1, ...bars.map((b) => b[2]));
    const mag = 10 ** Math.floor(Math.log10(ymax));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => ymax / s <= 5);
    const ytop = Math.ceil(ymax / step) * step;
    const sx = (x) => L + ((x - lo) / (hi - lo)) * (W - L - R);
    const sy = (y) => T + (1 - y / ytop) * (H - T - B);
    let s = `<svg class="hist" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img">`;
    for (let y = 0; y <= ytop; y += step) {
      s += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}"/>` +
        `<text class="ylab" x="${L - 6}" y="${sy(y) + 4}" text-anchor="end">${fmtInt(y)}</text>`;
    }
    for (const [x0, x1, c, tip] of bars) {
      if (!c) continue;
      const x = sx(Math.max(x0, lo)), w = Math.max(1, sx(Math.min(x1, hi)) - x - 1);
      const h = Math.max(1, sy(0) - sy(c));
      s += `<rect class="bar" x="${x.toFixed(1)}" y="${(sy(0) - h).toFixed(1)}" width="${w.toFixed(1)}" ` +
        `height="${h.toFixed(1)}"><title>${esc(tip)}</title></rect>`;
    }
    const every = Math.ceil((hi - lo) / 12);
    for (let k = lo; k <= hi; k += every) {
      s += `<line class="tick" x1="${sx(k)}" x2="${sx(k)}" y1="${sy(0)}" y2="${sy(0) + 5}"/>` +
        `<text class="xlab" x="${sx(k)}" y="${sy(0) + 18}" text-anchor="middle">${pow10(k)}</text>`;
    }
    if (marker && marker[0] > lo && marker[0] < hi) {
      const x = sx(marker[0]);
      s += `<line class="marker" x1="${x}" x2="${x}" y1="${T}" y2="${sy(0)}"/>` +
        `<text class="marker-label" x="${x + 4}" y="${T + 10}">${esc(marker[1])}</text>`;
    }
    s += `<line class="axis" x1="${L}" x2="${W - R}" y1="${sy(0)}" y2="${sy(0)}"/>` +
      `<text class="axis-label" x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">` +
      `${esc(xLabel)}</text>`;
    el.innerHTML = s + "</svg>";
  }

  // ---------- search box (both pages) ----------
  function wireSearch(onInput) {
    const input = $("#search-input");
    $("#search").addEventListener("submit", (e) => {
      e.preventDefault();
      const v = input.value.trim();
      if (/^\d+$/.test(v)) location.href = "latent.html?i=" + Number(v);
      else input.classList.add("invalid");
    });
    input.addEventListener("input", () => {
      input.classList.remove("invalid");
      if (onInput) onInput();
    });
    // ?search=N types N in the box and submits it, as a user would (a headless browser's test)
    const typed = new URLSearchParams(location.search).get("search");
    if (typed !== null) {
      input.value = typed;
      $("#search").requestSubmit();
    }
  }

  // ---------- index.html ----------
  function renderIndex() {
    const d = INDEX.d_sae, F = INDEX.frequency, M = INDEX.mean, X = INDEX.max;
    const params = new URLSearchParams(location.search);
    const live = F.filter((f) => f > 0), dead = d - live.length;
    $("#meta").innerHTML = `SAE <b>${esc(INDEX.sae)}</b> · hook <b>${esc(INDEX.hook)}</b>` +
      ` · architecture <b>${esc(INDEX.architecture)}</b>`;
    $("#summary").innerHTML = `<span id="n-latents">${fmtInt(d)}</span> latents · ` +
      `<span id="n-tokens">${fmtInt(INDEX.tokens)}</span> tokens counted · ` +
      `<span id="n-dead">${fmtInt(dead)}</span> dead (${fmtFreq(dead / Math.max(1, d))})`;

    // density of log10(frequency) over live latents
    if (live.length) {
      const logs = live.map(Math.log10);
      const lo = Math.floor(Math.min(...logs));
      const hi = Math.max(lo + 1, Math.ceil(Math.max(...logs)));
      const n = 40, w = (hi - lo) / n, counts = new Array(n).fill(0);
      for (const x of logs) counts[Math.min(n - 1, Math.floor((x - lo) / w))]++;
      chart($("#density"), counts.map((c, b) => [lo + b * w, lo + (b + 1) * w, c,
        `${fmtFreq(10 ** (lo + b * w))} – ${fmtFreq(10 ** (lo + (b + 1) * w))}: ${c} latents`]),
      lo, hi, "frequency (log scale)");
    } else {
      $("#density").innerHTML = '<p class="hint">No latent fired.</p>';
    }
    $("#dead-note").textContent = dead
      ? `${fmtInt(dead)} dead latent${dead === 1 ? "" : "s"} (never fired) not in the histogram.`
      : "No dead latents.";

    // table: one pre-rendered row string per latent, joined in sort order and filtered
    const rows = F.map((f, i) => `<tr data-latent="${i}"${f ? "" : ' class="dead"'}>` +
      `<td class="num"><a href="latent.html?i=${i}">${i}</a></td>` +
      `<td class="num">${f ? fmtFreq(f) : "dead"}</td><td class="num">${fmtNum(M[i])}</td>` +
      `<td class="num">${fmtNum(X[i])}</td></tr>`);
    const cols = { frequency: F, mean: M, max: X };
    const table = $("#latents"), tbody = table.tBodies[0], input = $("#search-input");
    let key = cols[params.get("sort")] ? params.get("sort") : "latent";
    let desc = params.get("order") ? params.get("order") === "desc" : key !== "latent";
    let order = [];

    function sort() {
      order = F.map((_, i) => i);
      const v = cols[key];
      if (v) order.sort((a, b) => (desc ? v[b] - v[a] : v[a] - v[b]) || a - b);
      else if (desc) order.reverse();
      table.dataset.sort = key;
      table.dataset.order = desc ? "desc" : "asc";
      for (const th of table.tHead.rows[0].cells) {
        const on = th.dataset.sort === key;
        th.className = "num" + (on ? (desc ? " sorted desc" : " sorted asc") : "");
        th.setAttribute("aria-sort", on ? (desc ? "descending" : "ascending") : "none");
      }
    }
    function draw() {
      const q = input.value.trim();
      const shown = q ? order.filter((i) => String(i).startsWith(q)) : order;
      tbody.innerHTML = shown.length ? shown.map((i) => rows[i]).join("")
        : `<tr class="empty"><td colspan="4">No latent number starts with “${esc(q)}”.</td></tr>`;
      $("#row-count").textContent = q
        ? `${fmtInt(shown.length)} of ${fmtInt(d)} latents start with “${q}”`
        : `${fmtInt(d)} latents · click a column to sort`;
    }
    table.tHead.addEventListener("click", (e) => {
      const th = e.target.closest("th[data-sort]");
      if (!th) return;
      if (th.dataset.sort === key) desc = !desc;
      else { key = th.dataset.sort; desc = key !== "latent"; }
      sort();
      draw();
    });
    input.value = params.get("q") || "";
    wireSearch(draw);
    sort();
    draw();
    document.body.dataset.state = "ready";
  }

  // ---------- latent.html ----------
  function requested() { // the latent number asked for: ?i=N, else #N, else 0
    const q = new URLSearchParams(location.search).get("i");
    const raw = (q !== null ? q : decodeURIComponent(location.hash.slice(1))).trim();
    return raw === "" ? "0" : raw;
  }

  function showLatent() {
    const raw = requested(), d = INDEX.d_sae;
    const i = /^\d+$/.test(raw) ? Number(raw) : NaN;
    $("#latent-number").textContent = Number.isNaN(i) ? "Latent ?" : `Latent ${i}`;
    for (const [id, j] of [["#prev", i - 1], ["#next", i + 1]]) {
      const ok = j >= 0 && j < d;
      if (ok) $(id).href = `latent.html?i=${j}`;
      else $(id).removeAttribute("href");
      $(id).classList.toggle("disabled", !ok);
    }
    if (Number.isNaN(i)) return showError(`“${raw}” is not a latent number. ` +
      `Give one from 0 to ${d - 1}, e.g. latent.html?i=12.`);
    if (i >= d) return showError(`Latent ${i} is out of range: this SAE has latents 0 to ${d - 1}.`);
    $("#error").hidden = true;
    current = i;
    document.title = `Latent ${i} · ${INDEX.title}`;
    const k = Math.floor(i / INDEX.shard_size);
    if (shards[k]) return renderLatent(shards[k], k);
    $("#loading").hidden = false;
    const file = `data/latents-${String(k).padStart(5, "0")}.js`;
    const tag = document.createElement("script");
    tag.src = file;
    tag.onerror = () => window.actstoreMissing(file);
    document.body.appendChild(tag);
  }

  function exampleHtml(ex, max) {
    let h = "";
    ex.tokens.forEach((t, j) => {
      const a = ex.acts[j] || 0, o = max > 0 ? Math.min(1, Math.max(0, a / max)) : 0;
      const style = o > 0 ? ` style="background-color: rgba(255, 122, 26, ${o.toFixed(3)})"` : "";
      const id = ex.ids && ex.ids[j] !== undefined ? ` · id ${ex.ids[j]}` : "";
      const tip = `activation ${fmtNum(a)}${id} · ${JSON.stringify(t)}`;
      h += `<span class="tok${j === ex.focus ? " focus" : ""}" data-act="${a}" title="${esc(tip)}"` +
        `${style}>${esc(showTok(t))}</span>`;
    });
    return `<div class="example" data-token-index="${ex.token_index}" data-activation="${ex.activation}">` +
      `<div class="ex-act" title="activation on the bold token">${fmtNum(ex.activation)}</div>` +
      `<div class="ctx">${h}</div></div>`;
  }
  const examplesHtml = (exs, max) => (exs && exs.length
    ? exs.map((ex) => exampleHtml(ex, max)).join("") : '<p class="hint">No examples.</p>');

  const stat = (name, label, value, sub) => `<div class="stat" data-stat="${name}">` +
    `<div class="label">${label}</div><div class="value">${value}</div>` +
    (sub ? `<div class="sub">${sub}</div>` : "") + "</div>";
  const logitRows = (list, cls) => (list || []).map(([t, v]) =>
    `<tr><td><span class="chip">${esc(showTok(t))}</span></td>` +
    `<td class="num ${cls}">${v > 0 ? "+" : ""}${Number(v).toFixed(3)}</td></tr>`).join("");
  const bandsHtml = (bands, max) => (bands || []).map((q) =>
    `<div class="band" data-band="${esc(q.band)}"><h3>${esc(q.band)}</h3>` +
    `<div class="examples">${examplesHtml(q.examples, max)}</div></div>`).join("");

  function activationChart(rec) { // rec.histogram over the shared log-spaced edges
    const E = INDEX.histogram_edges, C = rec.histogram, n = C.length;
    const first = C.findIndex((c) => c > 0), last = n - 1 - [...C].reverse().findIndex((c) => c > 0);
    const lo = Math.floor(Math.log10(E[Math.max(0, first)]));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(E[Math.min(n, last + 1)])));
    const range = (b) => (b === 0 ? `below ${fmtNum(E[1])}`
      : b === n - 1 ? `above ${fmtNum(E[b])}` : `${fmtNum(E[b])} – ${fmtNum(E[b + 1])}`);
    const bars = C.map((c, b) => [Math.log10(E[b]), Math.log10(E[b + 1]), c,
      `${range(b)}: ${fmtInt(c)} tokens`]);
    chart($("#histogram .chart"), bars, lo, hi, "activation (log scale)",
      rec.mean > 0 ? [Math.log10(rec.mean), `mean ${fmtNum(rec.mean)}`] : null, 250);
  }

  function renderLatent(recs, k) {
    const i = current, guess = recs[i - k * INDEX.shard_size];
    const rec = guess && guess.latent === i ? guess : recs.find((r) => r.latent === i);
    if (!rec) return showError(`Latent ${i} is missing from its data file.`);
    const live = rec.count > 0, logits = Boolean(INDEX.has_logits && rec.logits);
    $("#loading").hidden = true;
    $("#content").hidden = false;
    $("#dead").hidden = live;
    $("#dead").textContent = live ? ""
      : `Latent ${i} never fired on the ${fmtInt(INDEX.tokens)} counted tokens (dead latent).`;
    $("#stats").innerHTML =
      stat("count", "Count", fmtInt(rec.count), `of ${fmtInt(INDEX.tokens)} tokens`) +
      stat("frequency", "Frequency", fmtFreq(rec.frequency),
        live ? `1 in ${fmtInt(1 / rec.frequency)} tokens` : "never fired") +
      stat("mean", "Mean activation", fmtNum(rec.mean), "when firing") +
      stat("max", "Max activation", fmtNum(rec.max), "");
    for (const id of ["#histogram", "#top", "#quantiles"]) $(id).hidden = !live;
    $("#logits").hidden = !logits;
    $(".overview").classList.toggle("single", !logits || !live);
    if (logits) {
      $("#logits-top").innerHTML = logitRows(rec.logits.top, "pos");
      $("#logits-bottom").innerHTML = logitRows(rec.logits.bottom, "neg");
    }
    if (live) {
      activationChart(rec);
      $("#top .examples").innerHTML = examplesHtml(rec.top, rec.max);
      $("#quantiles .bands").innerHTML = bandsHtml(rec.quantiles, rec.max) ||
        '<p class="hint">No examples.</p>';
    }
    document.body.dataset.state = "ready";
  }


  // ---------- data callbacks ----------
  window.actstoreIndex = function (index) {
    INDEX = index;
    $("#title").textContent = index.title;
    document.title = index.title;
    if (page === "index") return renderIndex();
    wireSearch(null);
    window.addEventListener("hashchange", () => {
      if (new URLSearchParams(location.search).get("i") === null) showLatent();
    });
    showLatent();
  };
  window.actstoreLatents = function (k, records) {
    shards[k] = records;
    if (page === "latent" && INDEX && current !== null && Math.floor(current / INDEX.shard_size) === k) {
      renderLatent(records, k);
    }
  };
})();
