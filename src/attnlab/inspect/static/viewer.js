// attnlab attention viewer: head view, model view and per-token weights of one AttentionMap.
// The map is AttentionMap.to_json(), embedded in <script id="attnlab-data">; probs[layer][head][query][key].
// Everything is drawn here with no library and no request; in live mode (body data-live="true") the
// text box POSTs to /api/attention and the answer replaces the map.
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
  const ROW = 22;                 // head view: pixels per token row
  const GAP = 170;                // head view: width of the band the lines cross
  const MIN_LINE_WEIGHT = 0.002;  // lines below this are invisible anyway; skipping them keeps long inputs fast
  const AVERAGE = "avg";

  const state = {
    map: null,       // the AttentionMap JSON
    layer: 0,        // position along map.layers
    head: 0,         // position along map.heads, or AVERAGE
    sink: false,     // first token set aside (AttentionMap.without_sink)
    focus: null,     // last hovered token: {side: "query" | "key", index}
    matrixKey: "",   // which (layer, head, sink) `matrixCache` holds
    matrixCache: null,
    request: 0,      // live mode: number of the latest request; answers to older ones are dropped
  };

  const byId = (id) => document.getElementById(id);

  function element(tag, attributes = {}, text = "") {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text) node.textContent = text;
    return node;
  }

  function svgElement(tag, attributes = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }

  // Spaces and line breaks are part of a token (" it" is not "it"): make them visible.
  const showToken = (token) => token.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  const quoted = (index) => `${index} “${showToken(state.map.tokens[index])}”`;
  const headName = (head) => (head === AVERAGE ? "all heads averaged" : `head ${state.map.heads[head]}`);
  const sinkAside = () => state.sink || state.map.sink_removed;

  // ---- the numbers ---------------------------------------------------------------------------

  // Same rule as AttentionMap.without_sink: column 0 set to 0, each row renormalised to sum to 1;
  // a row with nothing left (the first token's own row, in a decoder) stays all zeros.
  function withoutSink(rows) {
    return rows.map((row) => {
      const rest = row.slice();
      rest[0] = 0;
      const mass = rest.reduce((sum, weight) => sum + weight, 0);
      return mass > 0 ? rest.map((weight) => weight / mass) : rest;
    });
  }

  // The T×T matrix (rows = query, columns = key) of one layer and head, or of all heads averaged.
  // With the sink set aside, each head is renormalised first and then averaged, which is
  // AttentionMap.without_sink().probs.mean(heads): every head keeps an equal voice.
  function headMatrix(layer, head, sink) {
    if (head === AVERAGE) {
      const heads = state.map.heads.map((_, h) => headMatrix(layer, h, sink));
      return heads[0].map((row, query) => row.map((_, key) =>
        heads.reduce((sum, matrix) => sum + matrix[query][key], 0) / heads.length));
    }
    const rows = state.map.probs[layer][head];
    return sink ? withoutSink(rows) : rows;
  }

  function selectedMatrix() {
    const key = `${state.layer}|${state.head}|${state.sink}`;
    if (key !== state.matrixKey) {
      state.matrixCache = headMatrix(state.layer, state.head, state.sink);
      state.matrixKey = key;
    }
    return state.matrixCache;
  }

  // White for 0 to dark blue for 1, linear: the darkness is the weight, nothing stretched.
  function colour(weight) {
    const w = Math.min(1, Math.max(0, weight));
    return [255 - w * (255 - 8), 255 - w * (255 - 48), 255 - w * (255 - 107)];
  }

  // ---- header and controls ----------------------------------------------------------------------

  function renderInfo() {
    const map = state.map;
    const info = byId("map-info");
    info.textContent = "";
    info.dataset.text = map.text;
    const kind = map.causal
      ? "decoder: causal, each token attends to itself and the tokens before it"
      : "encoder: bidirectional, each token attends to every token";
    info.append(`${map.model} · ${map.tokens.length} tokens · ${map.layers.length} layers × ${map.heads.length} heads`
      + ` (${map.n_query_heads} query / ${map.n_kv_heads} key-value heads) · ${kind} · text: `,
    element("span", { class: "text" }, map.text));
    const notes = byId("notes");
    notes.textContent = "";
    for (const note of map.notes) notes.append(element("li", {}, note));
  }

  function fillSelectors() {
    const map = state.map;
    const layers = byId("layer-select");
    layers.textContent = "";
    map.layers.forEach((layer, index) => layers.append(element("option", { value: index }, `layer ${layer}`)));
    layers.value = String(state.layer);
    const heads = byId("head-select");
    heads.textContent = "";
    heads.append(element("option", { value: AVERAGE }, "all heads averaged"));
    const groupSize = map.n_query_heads / map.n_kv_heads;
    map.heads.forEach((head, index) => {
      const kv = map.n_kv_heads < map.n_query_heads ? ` (shares key-value head ${Math.floor(head / groupSize)})` : "";
      heads.append(element("option", { value: index }, `head ${head}${kv}`));
    });
    heads.value = String(state.head);
    const sink = byId("sink-toggle");
    sink.disabled = map.sink_removed;  // the server already set it aside: there is nothing to bring back
    sink.checked = state.sink || map.sink_removed;
  }

  function renderSinkNote() {
    const note = byId("sink-note");
    const on = sinkAside();
    note.hidden = !on;
    document.body.classList.toggle("sink-on", on);
    note.textContent = on
      ? `Attention sink set aside: the first token ${quoted(0)} gets weight 0 and every query's remaining weights`
        + " are renormalised to sum to 1 (a query whose only weight was on it shows all zeros)."
      : "";
  }

  // ---- head view: queries on the left, keys on the right, one line per weight ------------------

  function renderHeadView() {
    const map = state.map;
    const matrix = selectedMatrix();
    const count = map.tokens.length;
    const longest = Math.max(...map.tokens.map((token) => showToken(token).length));
    const column = Math.min(230, Math.max(100, longest * 8 + 34));  // at least the column title
    const top = 26;
    const svg = svgElement("svg", { width: 2 * column + GAP, height: top + count * ROW + 4, role: "img" });
    svg.setAttribute("aria-label", "head view: query tokens on the left, key tokens on the right");
    const title = (x, anchor, text) => {
      const node = svgElement("text", { x, y: 14, "text-anchor": anchor, class: "column-title" });
      node.textContent = text;
      svg.append(node);
    };
    title(column - 8, "end", "query (from)");
    title(column + GAP + 8, "start", "key (to)");
    const y = (index) => top + index * ROW + ROW / 2;

    const allLines = svgElement("g", { class: "all-lines" });
    for (let query = 0; query < count; query++) {
      for (let key = 0; key < count; key++) {
        const weight = matrix[query][key];
        if (weight < MIN_LINE_WEIGHT) continue;
        allLines.append(svgElement("line", {
          x1: column, y1: y(query), x2: column + GAP, y2: y(key), "stroke-width": 0.5 + 5 * weight,
          "stroke-opacity": weight, "data-query": query, "data-key": key,
        }));
      }
    }
    svg.append(allLines, svgElement("g", { class: "focus-lines" }));

    for (const side of ["query", "key"]) {
      map.tokens.forEach((token, index) => {
        const left = side === "query";
        const group = svgElement("g", {
          id: `${side}-${index}`, class: `token ${side}`, tabindex: 0, "data-index": index, "data-side": side,
        });
        if (sinkAside() && index === 0 && !left) group.classList.add("sink-aside");
        const rect = svgElement("rect", {
          x: left ? 0 : column + GAP, y: top + index * ROW, width: column, height: ROW, rx: 3,
        });
        const text = svgElement("text", {
          x: left ? column - 8 : column + GAP + 8, y: y(index) + 4, "text-anchor": left ? "end" : "start",
          class: "token-text",
        });
        text.textContent = showToken(token);
        const label = svgElement("title");
        label.textContent = `${side} ${index}: ${JSON.stringify(token)} (id ${map.token_ids[index]})`;
        group.append(label, rect, text);
        group.addEventListener("mouseenter", () => focusToken(side, index));
        group.addEventListener("focus", () => focusToken(side, index));
        group.addEventListener("mouseleave", unfocusLines);
        group.addEventListener("blur", unfocusLines);
        svg.append(group);
      });
    }
    const view = byId("head-view");
    view.textContent = "";
    view.append(svg);
    byId("head-view-title").textContent = `layer ${map.layers[state.layer]}, ${headName(state.head)}`
      + (sinkAside() ? ", sink set aside" : "");
    if (state.focus) drawFocusLines();
  }

  function focusToken(side, index) {
    state.focus = { side, index };
    drawFocusLines();
    renderWeights();
  }

  // Only the hovered token's lines, in the focus colour and a little more opaque than the weight (a 0.15
  // line would be hard to see alone; the thickness still says the weight); the rest fade but stay for context.
  function drawFocusLines() {
    const svg = byId("head-view").querySelector("svg");
    const group = svg.querySelector(".focus-lines");
    group.textContent = "";
    svg.querySelectorAll(".token.focused").forEach((node) => node.classList.remove("focused"));
    const { side, index } = state.focus;
    byId(`${side}-${index}`).classList.add("focused");
    svg.classList.add("focusing");
    for (const line of svg.querySelectorAll(`.all-lines line[data-${side}="${index}"]`)) {
      const copy = line.cloneNode();
      copy.setAttribute("stroke-opacity", 0.25 + 0.75 * Number(line.getAttribute("stroke-opacity")));
      group.append(copy);
    }
  }

  function unfocusLines() {
    const svg = byId("head-view").querySelector("svg");
    svg.classList.remove("focusing");
    svg.querySelector(".focus-lines").textContent = "";
  }

  // ---- the weights of the hovered token -------------------------------------------------------------

  function renderWeights() {
    const table = byId("weights-table");
    const title = byId("weights-title");
    const sum = byId("weights-sum");
    table.textContent = "";
    sum.textContent = "";
    if (!state.focus) {
      title.textContent = "Hover a token to see its weights";
      delete title.dataset.side;
      return;
    }
    const map = state.map;
    const matrix = selectedMatrix();
    const { side, index } = state.focus;
    const asQuery = side === "query";
    title.dataset.side = side;
    title.dataset.index = index;
    title.textContent = asQuery
      ? `query ${quoted(index)} → weight on each key (row ${index})`
      : `key ${quoted(index)} ← weight from each query (column ${index})`;
    const header = element("tr");
    for (const name of [asQuery ? "key" : "query", "token", "", "weight"]) header.append(element("th", {}, name));
    table.append(header);
    let total = 0;
    map.tokens.forEach((token, other) => {
      const [query, key] = asQuery ? [index, other] : [other, index];
      const weight = matrix[query][key];
      total += weight;
      const row = element("tr");
      if (map.causal && key > query) {
        row.classList.add("future");
        row.title = "the key comes after the query: a causal model cannot look ahead";
      }
      if (sinkAside() && key === 0) {
        row.classList.add("sink-aside");
        row.title = "first token set aside (attention sink)";
      }
      const bar = element("span", { class: "bar" });
      bar.style.width = `${Math.round(weight * 80)}px`;
      const value = element("td", { class: "num weight", [`data-${asQuery ? "key" : "query"}-index`]: other,
        "data-weight": String(weight) }, weight.toFixed(4));
      const cell = element("td");
      cell.append(bar);
      row.append(element("td", { class: "idx" }, String(other)), element("td", { class: "tok" }, showToken(token)),
        cell, value);
      table.append(row);
    });
    if (asQuery) sum.textContent = `sum of the row: ${total.toFixed(4)}`;
  }

  // ---- heatmaps: the selected head large, every head small ---------------------------------------

  function paint(canvas, matrix) {
    const count = matrix.length;
    canvas.width = count;
    canvas.height = count;
    const context = canvas.getContext("2d");
    const image = context.createImageData(count, count);
    for (let query = 0; query < count; query++) {
      for (let key = 0; key < count; key++) {
        const [r, g, b] = colour(matrix[query][key]);
        const at = 4 * (query * count + key);
        image.data[at] = r;
        image.data[at + 1] = g;
        image.data[at + 2] = b;
        image.data[at + 3] = 255;
      }
    }
    context.putImageData(image, 0, 0);
  }

  function renderHeatmap() {
    const map = state.map;
    const matrix = selectedMatrix();
    const count = map.tokens.length;
    const cell = Math.max(2, Math.min(28, Math.floor(460 / count)));
    const labelled = cell >= 10;
    const canvas = byId("heatmap");
    const context = canvas.getContext("2d");
    const font = "12px ui-monospace, 'DejaVu Sans Mono', monospace";
    context.font = font;
    const labelWidth = labelled ? Math.min(140, Math.max(...map.tokens.map((t) => context.measureText(showToken(t)).width))) + 8 : 0;
    const left = 24 + labelWidth;  // room for the axis titles, then the token labels
    const top = 22 + labelWidth;
    canvas.width = left + count * cell + 4;
    canvas.height = top + count * cell + 4;
    context.font = font;
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    const pixels = document.createElement("canvas");
    paint(pixels, matrix);
    context.imageSmoothingEnabled = false;
    context.drawImage(pixels, left, top, count * cell, count * cell);
    context.fillStyle = "#5c6475";
    context.font = "bold 12px system-ui, sans-serif";
    context.fillText("key (to) →", left, 14);
    context.save();
    context.translate(6, top);  // turned a quarter clockwise, the glyphs stand to the right of x = 6
    context.rotate(Math.PI / 2);
    context.fillText("query (from) →", 0, 0);
    context.restore();
    if (labelled) {
      context.font = font;
      context.fillStyle = "#1d2330";
      context.textBaseline = "middle";
      context.textAlign = "right";
      map.tokens.forEach((token, index) => {
        context.fillText(showToken(token), left - 4, top + index * cell + cell / 2, labelWidth - 6);
        context.save();
        context.translate(left + index * cell + cell / 2, top - 4);
        context.rotate(Math.PI / 2);
        context.fillText(showToken(token), 0, 0, labelWidth - 6);
        context.restore();
      });
      context.textAlign = "start";
      context.textBaseline = "alphabetic";
    }
    canvas.dataset.left = left;
    canvas.dataset.top = top;
    canvas.dataset.cell = cell;
    byId("heatmap-title").textContent = `layer ${map.layers[state.layer]}, ${headName(state.head)}`
      + " (darker = more weight)";
  }

  function readHeatmapCell(event) {
    if (!state.map) return;
    const canvas = byId("heatmap");
    const box = canvas.getBoundingClientRect();
    const { left, top, cell } = canvas.dataset;
    const key = Math.floor((event.clientX - box.left - Number(left)) / Number(cell));
    const query = Math.floor((event.clientY - box.top - Number(top)) / Number(cell));
    const count = state.map.tokens.length;
    const readout = byId("heatmap-cell");
    if (query < 0 || key < 0 || query >= count || key >= count) {
      readout.textContent = "Point at a cell to read its weight.";
      return;
    }
    readout.textContent = `query ${quoted(query)} → key ${quoted(key)}: ${selectedMatrix()[query][key].toFixed(4)}`;
  }

  function renderModelView() {
    const map = state.map;
    const grid = byId("model-view");
    grid.textContent = "";
    const choices = [...map.heads.map((_, index) => index), AVERAGE];
    grid.style.gridTemplateColumns = `auto repeat(${choices.length}, auto)`;
    grid.append(element("span", { class: "label" }, ""));
    for (const head of choices) {
      grid.append(element("span", { class: "label" }, head === AVERAGE ? "avg" : `h${map.heads[head]}`));
    }
    map.layers.forEach((layer, layerIndex) => {
      grid.append(element("span", { class: "label" }, `L${layer}`));
      for (const head of choices) {
        const headLabel = head === AVERAGE ? AVERAGE : map.heads[head];
        const canvas = element("canvas", {
          id: `thumb-${layer}-${headLabel}`, "data-layer": layerIndex, "data-head": head, tabindex: 0,
          title: `layer ${layer}, ${headName(head)}: click to select`,
        });
        paint(canvas, headMatrix(layerIndex, head, state.sink));
        const choose = () => select(layerIndex, head);
        canvas.addEventListener("click", choose);
        canvas.addEventListener("keydown", (event) => { if (event.key === "Enter") choose(); });
        grid.append(canvas);
      }
    });
    markSelectedThumbnail();
  }

  function markSelectedThumbnail() {
    for (const canvas of byId("model-view").querySelectorAll("canvas")) {
      const chosen = canvas.dataset.layer === String(state.layer) && canvas.dataset.head === String(state.head);
      canvas.classList.toggle("selected", chosen);
    }
  }

  // ---- putting it together ---------------------------------------------------------------------------

  function renderSelection() {
    renderHeadView();
    renderHeatmap();
    renderWeights();
    markSelectedThumbnail();
  }

  function select(layer, head) {
    state.layer = layer;
    state.head = head;
    byId("layer-select").value = String(layer);
    byId("head-select").value = String(head);
    renderSelection();
  }

  function show(map) {
    state.map = map;
    state.matrixKey = "";
    state.focus = null;
    if (state.layer >= map.layers.length) state.layer = 0;
    if (state.head !== AVERAGE && state.head >= map.heads.length) state.head = 0;
    state.sink = state.sink && !map.sink_removed;
    renderInfo();
    fillSelectors();
    renderSinkNote();
    renderModelView();
    renderSelection();
  }

  function wireControls() {
    byId("layer-select").addEventListener("change", (event) => select(Number(event.target.value), state.head));
    byId("head-select").addEventListener("change", (event) => {
      const value = event.target.value;
      select(state.layer, value === AVERAGE ? AVERAGE : Number(value));
    });
    byId("sink-toggle").addEventListener("change", (event) => {
      if (!state.map) return;
      state.sink = event.target.checked;
      renderSinkNote();
      renderModelView();
      renderSelection();
    });
    byId("heatmap").addEventListener("mousemove", readHeatmapCell);
  }

  // ---- live mode: ask the server for the map of new text -----------------------------------------

  function showError(message) {
    const error = byId("error");
    error.textContent = message;
    error.hidden = !message;
  }

  async function requestMap(text) {
    const number = ++state.request;
    const status = byId("status");
    status.textContent = "computing…";
    let response;
    let body;
    try {
      response = await fetch("/api/attention", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }),
      });
      body = await response.json();
    } catch (failure) {
      if (number !== state.request) return;
      status.textContent = "";
      showError(`could not get an answer from the attnlab server (${failure.message}): is it still running?`);
      return;
    }
    if (number !== state.request) return;  // a newer request went out meanwhile: its answer wins
    status.textContent = "";
    if (!response.ok || body.error) {
      showError(body.error || `the server answered ${response.status}`);
      return;
    }
    showError("");
    show(body);
  }

  function wireLive() {
    const input = byId("text-input");
    byId("live-form").addEventListener("submit", (event) => {
      event.preventDefault();
      requestMap(input.value);
    });
    input.addEventListener("keydown", (event) => {  // Enter sends, Shift+Enter starts a new line
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        requestMap(input.value);
      }
    });
  }

  wireControls();
  const data = JSON.parse(byId("attnlab-data").textContent);
  const live = document.body.dataset.live === "true";
  if (live) wireLive();
  if (data) show(data);
  else if (live) requestMap(byId("text-input").value);
})();
