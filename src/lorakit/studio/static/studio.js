// lorakit studio: one page, three views (#/ runs, #/run/<id>, #/compare/<id>,<id>,...).
// Every text from a run goes into the page as textContent; HTML comes only from the server's
// report sections, which escape what they show (lorakit.report.format.esc).
"use strict";

const view = () => document.getElementById("view");
let stream = null; // the open EventSource of a run page

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function api(path, options) {
  const opts = Object.assign({headers: {}}, options || {});
  if (opts.method && opts.method !== "GET") opts.headers["X-Lorakit-Studio"] = "1";
  const response = await fetch(path, opts);
  const body = await response.json().catch(() => ({error: {message: `HTTP ${response.status}`}}));
  if (!response.ok) {
    const e = new Error((body.error && body.error.message) ||
                        (body.problems ? "the config has problems (shown beside their fields)" : `HTTP ${response.status}`));
    e.detail = body.error || {problems: body.problems};
    throw e;
  }
  return body;
}

function showError(e) {
  const d = e.detail || {};
  view().replaceChildren(el("div", {class: "error", role: "alert"},
    el("p", {}, el("strong", {}, "Error: "), e.message), d.hint ? el("p", {class: "dim"}, "fix: " + d.hint) : null));
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(digits || 4);
  return String(v);
}

// ------------------------------------------------------------------ runs

const COLUMNS = [
  ["name", "name"], ["state", "state"], ["base", "base"], ["method", "method"], ["template", "template"],
  ["steps", "steps"], ["train_loss", "train loss"], ["eval_loss", "eval loss"], ["score", "exact match"],
  ["date", "date"],
];
const runsState = {sort: "date", desc: true, filter: "", picked: new Set()};

function cell(row, key) {
  if (key === "score") return row.scores && row.scores.exact_match !== undefined ? row.scores.exact_match : null;
  if (key === "date") return row.modified;
  return row[key];
}

function groups(rows) {
  // a sweep's trials stay under it whatever the order: sort groups by their first row
  const out = [];
  for (const r of rows) {
    if (r.parent && out.length && out[out.length - 1][0].id === r.parent) out[out.length - 1].push(r);
    else out.push([r]);
  }
  return out;
}

function compareValues(a, b) {
  if (a === null || a === undefined) return b === null || b === undefined ? 0 : 1;
  if (b === null || b === undefined) return -1;
  return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
}

async function showRuns() {
  const data = await api("/api/runs");
  document.getElementById("folder").textContent = data.folder;
  const filter = el("input", {type: "search", id: "filter", placeholder: "filter: name, base, method, state…",
                              value: runsState.filter});
  const compareButton = el("button", {id: "compare", disabled: runsState.picked.size < 2}, "Compare");
  const table = el("table", {id: "runs", class: "num"});
  const draw = () => {
    const words = runsState.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const keep = (r) => words.every((w) => [r.id, r.base, r.method, r.state, r.template, r.kind]
      .some((x) => x && String(x).toLowerCase().includes(w)));
    let gs = groups(data.runs).map((g) => g.filter(keep)).filter((g) => g.length);
    const sign = runsState.desc ? -1 : 1;
    gs.sort((a, b) => sign * compareValues(cell(a[0], runsState.sort), cell(b[0], runsState.sort)));
    gs = gs.map((g) => [g[0], ...g.slice(1).sort((a, b) => sign * compareValues(cell(a, runsState.sort),
                                                                                 cell(b, runsState.sort)))]);
    const head = el("tr", {}, el("th", {}, ""), COLUMNS.map(([key, label]) => el("th", {
      class: "sortable" + (runsState.sort === key ? (runsState.desc ? " desc" : " asc") : ""), "data-key": key,
      onclick: () => { runsState.desc = runsState.sort === key ? !runsState.desc : key === "date"; runsState.sort = key; draw(); },
    }, label)));
    const body = gs.flat().map((r) => {
      const box = r.kind === "sweep" ? "" : el("input", {type: "checkbox", "data-id": r.id,
        checked: runsState.picked.has(r.id), onchange: (ev) => {
          if (ev.target.checked) runsState.picked.add(r.id); else runsState.picked.delete(r.id);
          compareButton.disabled = runsState.picked.size < 2;
        }});
      const name = r.kind === "sweep"
        ? el("span", {}, el("strong", {}, r.name), " ", el("span", {class: "dim"},
            `sweep: ${r.trials} trials` + (r.best ? `, best ${r.objective} ${fmt(r.best.value)} (trial ${r.best.trial})` : "")))
        : el("a", {href: "#/run/" + r.id, class: r.parent ? "trial" : ""}, r.parent ? r.name : r.id);
      return el("tr", {"data-id": r.id, class: r.kind}, el("td", {}, box), el("td", {}, name),
        el("td", {}, el("span", {class: "state " + r.state}, r.state)),
        ...["base", "method", "template"].map((k) => el("td", {}, r[k] || "")),
        ...["steps", "train_loss", "eval_loss", "score"].map((k) => el("td", {}, k === "score" && cell(r, k) !== null
          ? (100 * cell(r, k)).toFixed(1) + "%" : fmt(cell(r, k)))),
        el("td", {}, r.date || ""));
    });
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, body));
  };
  filter.addEventListener("input", () => { runsState.filter = filter.value; draw(); });
  compareButton.addEventListener("click", () => {
    location.hash = "#/compare/" + [...runsState.picked].map(encodeURIComponent).join(",");
  });
  draw();
  view().replaceChildren(el("h1", {}, "Runs"), el("div", {class: "bar"}, filter, compareButton),
    data.runs.length ? table : el("p", {class: "dim"}, "No runs here yet: train one with lorakit train CONFIG."));
}

// ------------------------------------------------------------------ one run

const ORDER = ["summary", "charts", "rollouts", "diagnostics", "evals", "data", "config", "merge", "exports"];

function section(name, html) {
  const box = el("div", {id: "section-" + name, class: "section"});
  box.innerHTML = html; // the report's own HTML, escaped where it was drawn
  return box;
}

async function showRun(id) {
  let data = await api("/api/run?id=" + encodeURIComponent(id));
  while (data.starting) { // started from the form: no folder until its process has loaded the model
    view().replaceChildren(el("h1", {}, "Run ", el("code", {}, id), " ", el("span", {class: "state starting", id: "state"}, "starting")),
      el("pre", {class: "msg log"}, data.starting.log));
    await new Promise((r) => setTimeout(r, 1000));
    if (location.hash !== "#/run/" + id) return;
    data = await api("/api/run?id=" + encodeURIComponent(id));
  }
  const badge = el("span", {id: "state", class: "state " + data.run.state}, data.run.state);
  const boxes = Object.fromEntries(ORDER.filter((n) => n in data.sections).map((n) => [n, section(n, data.sections[n])]));
  let browser = evalBrowser(id, data.eval_sets);
  const jobsBox = el("section", {id: "jobs"});
  const bar = actions(id, data, badge);
  const extra = {evals: () => browser, config: () => planBox(id)}; // what follows a report section
  view().replaceChildren(el("h1", {}, "Run ", el("code", {}, id), " ", badge), bar, jobsBox,
    ...ORDER.filter((n) => n in boxes).flatMap((n) => n in extra ? [boxes[n], extra[n]()] : [boxes[n]]));
  stream = new EventSource("/api/run/events?id=" + encodeURIComponent(id));
  stream.addEventListener("jobs", (ev) => drawJobs(jobsBox, JSON.parse(ev.data).jobs));
  stream.addEventListener("live", (ev) => {
    const msg = JSON.parse(ev.data);
    badge.textContent = msg.state;
    badge.className = "state " + msg.state;
    bar.dataset.state = msg.state;
    for (const [name, html] of Object.entries(msg.sections)) {
      if (boxes[name]) boxes[name].innerHTML = html;
    }
    if ("evals" in msg.sections) { // a stage wrote files: new eval sets, new downloads
      api("/api/run?id=" + encodeURIComponent(id)).then((fresh) => {
        const next = evalBrowser(id, fresh.eval_sets);
        browser.replaceWith(next);
        browser = next;
        bar.querySelector(".downloads").replaceWith(actions(id, fresh, badge).querySelector(".downloads"));
      }).catch(showError);
    }
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  });
}

// `lorakit plan` of the run's own config, on demand (it reads the tokenizer and the data: seconds),
// with the peak memory the finished training measured beside the planned one.
function planBox(id) {
  const out = el("div", {id: "plan-box"});
  const mib = (b) => (b / 2 ** 20).toLocaleString(undefined, {maximumFractionDigits: 0}) + " MiB";
  const button = el("button", {id: "plan", onclick: () => {
    button.disabled = true;
    out.replaceChildren(el("p", {class: "dim"}, "Planning…"));
    api("/api/run/plan?id=" + encodeURIComponent(id)).then((r) => {
      const lines = [];
      if (r.planned_peak_bytes && r.measured_peak_bytes) {
        lines.push(el("p", {id: "plan-check"}, `planned peak ${mib(r.planned_peak_bytes)}, measured ${mib(r.measured_peak_bytes)} ` +
          `(${(r.measured_peak_bytes / r.planned_peak_bytes).toFixed(2)}× the plan; ${r.measured_kind})`));
      }
      out.replaceChildren(...lines, el("pre", {id: "plan-report"}, r.plan));
    }, (e) => out.replaceChildren(el("p", {class: "said bad"}, e.message + (e.detail && e.detail.hint ? " — " + e.detail.hint : ""))))
      .finally(() => { button.disabled = false; });
  }}, "Plan this config");
  return el("div", {class: "section", id: "section-plan"}, el("h2", {}, "Plan"), button, out);
}

function post(path, body) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

function say(box, text, bad) {
  box.textContent = text;
  box.className = "said" + (bad ? " bad" : "");
}

// The buttons of a run: stop / resume its training, and the later stages as `lorakit` runs them.
function actions(id, data, badge) {
  const said = el("span", {id: "action-said", class: "said"});
  const act = (path, body) => post(path, Object.assign({id}, body)).then(
    (r) => say(said, r.job ? `started: lorakit ${r.job.command}` : `stop sent (pid ${r.pid}); the step under way finishes and a checkpoint is saved`),
    (e) => say(said, e.message + (e.detail && e.detail.hint ? " — " + e.detail.hint : ""), true));
  const split = el("select", {id: "eval-split"}, el("option", {value: "validation"}, "validation"), el("option", {value: "test"}, "test"));
  const base = el("input", {type: "checkbox", id: "eval-base"});
  const gguf = el("select", {id: "export-gguf"}, ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "iq4_xs", "q4_0", "f16", "auto"]
    .map((t) => el("option", {value: t}, t)));
  const ollama = el("input", {type: "checkbox", id: "export-ollama"});
  const downloads = el("span", {class: "downloads"},
    data.run.state === "done" ? el("a", {href: `/api/run/download?id=${encodeURIComponent(id)}&what=adapter`, id: "download-adapter"}, "adapter.zip") : null,
    ...(data.ggufs || []).map((f) => el("a", {href: `/api/run/download?id=${encodeURIComponent(id)}&what=gguf&file=${encodeURIComponent(f)}`}, f)));
  const bar = el("div", {class: "bar actions", id: "actions", "data-state": data.run.state},
    el("button", {id: "stop", class: "when-running", onclick: () => act("/api/run/stop", {})}, "Stop"),
    el("button", {id: "resume", class: "when-interrupted", onclick: () => act("/api/run/resume", {})}, "Resume"),
    el("span", {class: "when-done"}, el("button", {id: "eval", onclick: () => act("/api/run/stage", {kind: "eval", split: split.value, base: base.checked})}, "Eval"),
      " ", split, " ", el("label", {}, base, " with base")),
    el("button", {id: "merge", class: "when-done", onclick: () => act("/api/run/stage", {kind: "merge"})}, "Merge"),
    el("span", {class: "when-done"}, el("button", {id: "export", onclick: () => act("/api/run/stage", {kind: "export", gguf: gguf.value, ollama: ollama.checked})}, "Export"),
      " ", gguf, " ", el("label", {}, ollama, " Ollama")),
    downloads, said);
  return bar;
}

function drawJobs(box, jobs) {
  box.replaceChildren(...(jobs.length ? [el("h2", {}, "Jobs")] : []), ...jobs.map((j) =>
    el("div", {class: "job", "data-kind": j.kind, "data-state": j.state},
      el("div", {}, el("code", {}, "lorakit " + j.command), " ", el("span", {class: "state " + j.state.split(" ")[0]}, j.state)),
      el("pre", {class: "msg log"}, j.log))));
}

// ------------------------------------------------------------------ new run

async function showNew() {
  const [schema, files] = await Promise.all([api("/api/schema"), api("/api/files")]);
  const inputs = {};
  const problems = {};
  const list = el("datalist", {id: "data-files"}, files.files.map((f) => el("option", {value: f})));
  const name = el("input", {type: "text", id: "field-name", value: "", placeholder: "support-v1", required: true});
  problems.name = el("div", {class: "problem", id: "problem-name"});
  const method = () => (inputs["train.method"] ? inputs["train.method"].value : "sft");
  const sets = schema.sections.map(({section, fields}) => {
    const rows = fields.map((f) => {
      let input;
      if (f.widget === "bool") input = el("input", {type: "checkbox", checked: f.default === true});
      else if (f.widget === "choice") input = el("select", {}, f.choices.map((c) => el("option", {value: c === null ? "null" : String(c), selected: c === f.default}, c === null ? "null" : String(c))));
      else input = el("input", {type: "text", value: f.required ? "" : f.text, placeholder: f.required ? f.text : "",
                                list: f.key.startsWith("data.") && /^data\.(train|validation|test)$/.test(f.key) ? "data-files" : null});
      input.id = "field-" + f.key;
      input.dataset.key = f.key;
      input.dataset.initial = f.widget === "bool" ? String(f.default === true) : input.value;
      inputs[f.key] = input;
      problems[f.key] = el("div", {class: "problem", id: "problem-" + f.key});
      return el("div", {class: "field"}, el("label", {for: input.id}, el("code", {}, f.key), " ", el("span", {class: "dim"}, f.type)),
        input, problems[f.key], el("div", {class: "help dim"}, f.help + (f.required ? "" : ` (default: ${f.text})`)));
    });
    const open = ["model", "data", "lora", "train"].includes(section);
    return el("details", {class: "section-form", "data-section": section, open}, el("summary", {}, section), rows);
  });
  const general = el("div", {class: "problem", id: "problem-general"});
  const report = el("div", {id: "preview"});
  const values = () => {
    const out = {};
    for (const [key, input] of Object.entries(inputs)) {
      const now = input.type === "checkbox" ? String(input.checked) : input.value;
      if (now !== input.dataset.initial) out[key] = now;
    }
    return out;
  };
  const show = (found) => {
    for (const [key, box] of Object.entries(problems)) {
      box.textContent = found[key] || "";
      if (inputs[key]) inputs[key].classList.toggle("invalid", Boolean(found[key]));
      if (found[key] && inputs[key]) inputs[key].closest("details").open = true;
    }
    general.textContent = found[""] || "";
    return Object.keys(found).length === 0;
  };
  const check = el("button", {id: "check", onclick: async () => {
    report.replaceChildren(el("p", {class: "dim"}, "Checking, reading the data, planning…"));
    try {
      const r = await post("/api/check", {name: name.value, values: values()});
      if (show(r.problems)) report.replaceChildren(el("h2", {}, "Data"), el("pre", {id: "data-report"}, r.data),
                                                   el("h2", {}, "Plan"), el("pre", {id: "plan-report"}, r.plan));
      else report.replaceChildren();
    } catch (e) { report.replaceChildren(); general.textContent = e.message; }
  }}, "Check: data and plan");
  const start = el("button", {id: "start", onclick: async () => {
    try {
      const r = await post("/api/runs", {name: name.value, values: values()});
      location.hash = "#/run/" + r.run;
    } catch (e) {
      if (e.detail && e.detail.problems) show(e.detail.problems); else general.textContent = e.message;
    }
  }}, "Start training");
  view().replaceChildren(el("h1", {}, "New run"), list,
    el("p", {class: "dim"}, `Runs go to ${schema.runs}; data files from ${schema.data_roots.join(", ")}. Every field is a config key; "auto" follows the guide's table by dataset size. Only the fields you change are sent.`),
    el("div", {class: "field"}, el("label", {for: "field-name"}, "name"), name, problems.name),
    ...sets, el("div", {class: "bar"}, check, start), general, report);
}

// ------------------------------------------------------------------ playground

async function readEvents(response, onData) {
  // fetch's body as server-sent events: each "data: ..." line handed over as it arrives
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) if (line.startsWith("data: ")) onData(line.slice(6));
    }
  }
}

async function showPlay() {
  const [runs, state] = await Promise.all([api("/api/runs"), api("/api/playground")]);
  const done = runs.runs.filter((r) => r.kind !== "sweep" && r.state === "done");
  const picks = el("div", {id: "play-runs"}, done.map((r) => el("label", {class: "pick"},
    el("input", {type: "checkbox", value: r.id, checked: state.runs.includes(r.id)}), " ", r.id)));
  const said = el("span", {class: "said", id: "play-said"});
  const models = el("div", {id: "play-models"});
  const talk = el("div", {id: "play-talk"});
  const turns = []; // {user, answers: {model: text}}
  const input = el("textarea", {id: "play-input", rows: 3, placeholder: "Your message"});
  const system = el("input", {type: "text", id: "play-system", placeholder: "system message (optional)"});
  const temperature = el("input", {type: "number", id: "play-temperature", value: "0", min: "0", max: "5", step: "0.1"});
  const topP = el("input", {type: "number", id: "play-top-p", value: "1", min: "0.05", max: "1", step: "0.05"});
  const maxTokens = el("input", {type: "number", id: "play-max-tokens", value: "128", min: "1", max: "4096"});
  const seed = el("input", {type: "number", id: "play-seed", value: "0"});
  let loaded = state;
  const drawModels = () => models.replaceChildren(...(loaded.models || []).map((m) => el("label", {class: "pick"},
    el("input", {type: "checkbox", value: m, checked: true, "data-model": m}), " ", m)));
  const chosen = () => [...models.querySelectorAll("input:checked")].map((i) => i.value);
  const history = (model) => {
    const out = system.value ? [{role: "system", content: system.value}] : [];
    for (const t of turns) {
      out.push({role: "user", content: t.user});
      if (t.answers[model] !== undefined && t !== turns[turns.length - 1]) out.push({role: "assistant", content: t.answers[model]});
    }
    return out;
  };
  const drawTalk = () => talk.replaceChildren(...turns.map((t, k) => el("div", {class: "turn-row"},
    el("div", {class: "user"}, el("span", {class: "role"}, "user"), el("pre", {class: "msg"}, t.user)),
    el("div", {class: "answers"}, Object.entries(t.answers).map(([m, text]) => el("div", {class: "answer", "data-model": m, "data-turn": k},
      el("div", {class: "dim"}, m), el("pre", {class: "msg"}, text)))))));
  const load = el("button", {id: "play-load", onclick: async () => {
    const ids = [...picks.querySelectorAll("input:checked")].map((i) => i.value);
    say(said, "loading the base and the adapters…");
    try { loaded = await post("/api/playground/load", {ids}); drawModels(); say(said, `loaded: ${loaded.models.join(", ")}`); }
    catch (e) { say(said, e.message, true); }
  }}, "Load");
  const send = el("button", {id: "play-send", onclick: async () => {
    const text = input.value.trim();
    const names = chosen();
    if (!text || !names.length) return;
    const turn = {user: text, answers: Object.fromEntries(names.map((m) => [m, ""]))};
    turns.push(turn);
    input.value = "";
    drawTalk();
    // every model gets its own history: the user turns and its own earlier answers
    const body = {models: names, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value),
                  top_p: Number(topP.value), seed: seed.value === "" ? null : Number(seed.value)};
    try {
      const streams = names.map(async (m) => {
        const response = await fetch("/api/playground/chat", {method: "POST",
          headers: {"Content-Type": "application/json", "X-Lorakit-Studio": "1"},
          body: JSON.stringify(Object.assign({messages: history(m)}, body, {models: [m]}))});
        if (!response.ok) { const b = await response.json(); throw new Error(b.error ? b.error.message : `HTTP ${response.status}`); }
        await readEvents(response, (data) => {
          if (data === "[DONE]") return;
          const ev = JSON.parse(data);
          if (ev.text) { turn.answers[ev.model] += ev.text; drawTalk(); }
          if (ev.finish_reason) talk.dataset.finished = String(Number(talk.dataset.finished || 0) + 1);
        });
      });
      await Promise.all(streams);
      say(said, "");
    } catch (e) { say(said, e.message, true); }
  }}, "Send");
  drawModels();
  view().replaceChildren(el("h1", {}, "Playground"),
    el("p", {class: "dim"}, "The base and the adapters of the runs you pick, loaded once on the same decoder as lorakit serve; each answers the conversation with its own trained template. Temperature 0 is greedy."),
    el("h2", {}, "Runs"), picks, el("div", {class: "bar"}, load, said), el("h2", {}, "Models"), models,
    el("div", {class: "bar"}, el("label", {}, "temperature ", temperature), el("label", {}, "top-p ", topP),
      el("label", {}, "max tokens ", maxTokens), el("label", {}, "seed ", seed)),
    system, talk, input, el("div", {class: "bar"}, send));
}

// A word-level difference: the answer's words not in the longest common subsequence with the
// reference are marked, and the reference's words the answer lacks.
function lcsMarks(a, b) {
  const n = a.length, m = b.length;
  const t = Array.from({length: n + 1}, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    t[i][j] = a[i] === b[j] ? t[i + 1][j + 1] + 1 : Math.max(t[i + 1][j], t[i][j + 1]);
  const inA = new Array(n).fill(false), inB = new Array(m).fill(false);
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { inA[i] = inB[j] = true; i++; j++; } else if (t[i + 1][j] >= t[i][j + 1]) i++; else j++;
  }
  return [inA, inB];
}

function marked(words, keep, cls) {
  return words.flatMap((w, k) => [k ? " " : "", keep[k] ? w : el("mark", {class: cls}, w)]);
}

function evalBrowser(id, sets) {
  const box = el("section", {id: "examples"}, el("h2", {}, "Answers, one by one"));
  if (!sets.length) { box.append(el("p", {class: "missing"}, "Not evaluated yet: lorakit eval RUN writes the answers.")); return box; }
  const pick = el("select", {id: "eval-set"}, sets.map((s) => el("option", {value: s}, s)));
  const wrong = el("input", {type: "checkbox", id: "only-wrong"});
  const list = el("div", {id: "example-list"});
  const count = el("span", {class: "dim", id: "example-count"});
  const load = async () => {
    const data = await api(`/api/run/eval?id=${encodeURIComponent(id)}&set=${encodeURIComponent(pick.value)}`);
    const shown = data.examples.filter((r) => !wrong.checked || !(r.scores.tuned && r.scores.tuned.exact_match));
    count.textContent = `${shown.length} of ${data.examples.length} examples`;
    list.replaceChildren(...shown.map((r) => {
      const ref = r.reference.split(/\s+/).filter(Boolean);
      const rows = Object.entries(r.answers).map(([model, text]) => {
        const words = text.split(/\s+/).filter(Boolean);
        const [keepA] = lcsMarks(words, ref);
        const right = r.scores[model] && r.scores[model].exact_match;
        return el("tr", {class: right ? "right" : "wrong"}, el("th", {}, model, " ", el("span", {class: right ? "good" : "bad"}, right ? "✓" : "✗")),
          el("td", {}, el("pre", {class: "msg"}, marked(words, keepA, "ins"))));
      });
      const answer = (r.answers.tuned || "").split(/\s+/).filter(Boolean);
      const [, keepRef] = lcsMarks(answer, ref);
      const prompt = r.prompt.filter((t) => t.role !== "system").map((t) => t.content).join("\n");
      return el("div", {class: "sample example", "data-index": r.index},
        el("div", {class: "dim"}, `example ${r.index}`), el("pre", {class: "msg prompt"}, prompt),
        el("table", {class: "kv"}, el("tbody", {}, el("tr", {}, el("th", {}, "expected"),
          el("td", {}, el("pre", {class: "msg"}, marked(ref, keepRef, "del")))), rows)));
    }));
  };
  pick.addEventListener("change", load);
  wrong.addEventListener("change", load);
  box.append(el("div", {class: "bar"}, el("label", {}, "set ", pick), el("label", {}, wrong, " only wrong answers"), count), list);
  load().catch(showError);
  return box;
}

// ------------------------------------------------------------------ compare

async function showCompare(ids) {
  const data = await api("/api/compare?" + ids.map((i) => "id=" + encodeURIComponent(i)).join("&"));
  const part = (title, html, ident) => { const d = el("section", {id: ident}, el("h2", {}, title)); const b = el("div"); b.innerHTML = html; d.append(b); return d; };
  view().replaceChildren(el("h1", {}, "Compare ", ...ids.map((i) => el("code", {}, i + " "))),
    part("Curves", data.charts, "compare-charts"), part("Config differences", data.config, "compare-config"),
    part("Metrics", data.metrics, "compare-metrics"));
}

// ------------------------------------------------------------------ router

async function route() {
  if (stream) { stream.close(); stream = null; }
  const hash = location.hash.replace(/^#\/?/, "");
  try {
    if (hash.startsWith("run/")) await showRun(decodeURIComponent(hash.slice(4)));
    else if (hash.startsWith("compare/")) await showCompare(hash.slice(8).split(",").map(decodeURIComponent));
    else if (hash === "new") await showNew();
    else if (hash === "play") await showPlay();
    else await showRuns();
  } catch (e) {
    showError(e);
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
