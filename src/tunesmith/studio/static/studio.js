// tunesmith studio: the little JavaScript the pages need.  Every change goes to the JSON API with the studio's
// token (from the page's meta tag) in the X-Tunesmith-Token header; every failure is shown as the sentence the
// server sent.
"use strict";
const studio = {
  token() { return document.querySelector('meta[name="tunesmith-token"]').content; },
  notice(text, good) {
    const box = document.getElementById("notice");
    box.textContent = text; box.hidden = !text;
    box.className = "notice " + (good ? "good" : "bad");
    if (text) box.scrollIntoView({block: "nearest"});
  },
  async api(method, url, body, isForm) {
    const headers = {"X-Tunesmith-Token": studio.token()};
    if (body !== undefined && !isForm) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url, {method, headers, body: isForm ? body : (body === undefined ? undefined : JSON.stringify(body))});
    } catch (e) {
      throw new Error("the studio did not answer (is it still running?)");
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
    if (!response.ok) throw new Error((data && data.error) || ("the studio answered " + response.status));
    return data;
  },
  formObject(form) {
    const out = {};
    for (const el of form.elements) if (el.name && !el.disabled) out[el.name] = el.value;
    return out;
  },
  submitJson(form, method, url, then) {
    studio.notice("");
    studio.api(method, url, studio.formObject(form)).then(then).catch(e => studio.notice(e.message));
    return false;
  },
  // --- the train form
  formValues() {
    const values = {};
    for (const el of document.querySelectorAll("#form-view [name]")) {
      if (el.closest("fieldset").hidden) continue;
      values[el.name] = el.value;
    }
    return values;
  },
  methodChanged() {
    const method = document.querySelector('#form-view [name="method"]');
    if (!method) return;
    for (const fs of document.querySelectorAll("#form-view fieldset[data-methods]"))
      fs.hidden = !fs.dataset.methods.split(" ").includes(method.value);
  },
  chooseDataset(select, folder) {
    if (select.value) document.querySelector('#form-view [name="data.path"]').value = folder + "/" + select.value;
  },
  async showView(which) {
    studio.notice("");
    try {
      if (which === "yaml") {
        const data = await studio.api("POST", "/api/config/yaml", {values: studio.formValues()});
        document.getElementById("yaml-text").value = data.yaml;
      }
      document.getElementById("form-view").hidden = which !== "form";
      document.getElementById("yaml-view").hidden = which !== "yaml";
    } catch (e) { studio.notice(e.message); }
  },
  async yamlToForm() {
    try {
      const data = await studio.api("POST", "/api/config/form", {yaml: document.getElementById("yaml-text").value});
      for (const [key, value] of Object.entries(data.values)) {
        const el = document.querySelector(`#form-view [name="${CSS.escape(key)}"]`);
        if (el) el.value = value;
      }
      studio.methodChanged();
      studio.showView("form");
    } catch (e) { studio.notice(e.message); }
  },
  async currentYaml() {
    if (!document.getElementById("yaml-view").hidden) return document.getElementById("yaml-text").value;
    return (await studio.api("POST", "/api/config/yaml", {values: studio.formValues()})).yaml;
  },
  async estimate() {
    studio.notice("");
    const out = document.getElementById("estimate");
    out.textContent = "estimating...";
    out.className = "verdict";
    try {
      const est = await studio.api("POST", "/api/config/estimate", {yaml: await studio.currentYaml()});
      out.textContent = est.sentence;
      out.className = "verdict " + (est.memory.fits ? "good" : "bad");
    } catch (e) { out.textContent = ""; studio.notice(e.message); }
  },
  async launch(form, projectId, parentId) {
    studio.notice("");
    try {
      const yaml = await studio.currentYaml();
      const run = await studio.api("POST", `/api/projects/${projectId}/runs`,
        {name: form.run_name.value || "run", config_yaml: yaml, parent_id: parentId});
      location.href = "/runs/" + run.id;
    } catch (e) { studio.notice(e.message); }
    return false;
  },
  // --- watching a run
  async runAction(runId, action) {
    studio.notice("");
    try {
      const run = await studio.api("POST", `/api/runs/${runId}/${action}`);
      studio.showState(run);
      if (action === "resume") location.reload();
    } catch (e) { studio.notice(e.message); }
  },
  showState(s) {
    const el = document.getElementById("run-state");
    el.textContent = s.state + (s.resumable ? " · resumable" : "");
    el.className = "state state-" + s.state;
    const message = document.getElementById("run-message");
    message.textContent = s.message || "";
    message.className = ["failed", "interrupted"].includes(s.state) ? "sentence" : "meta";
    document.getElementById("stop").hidden = !["queued", "running"].includes(s.state);
    document.getElementById("resume").hidden = !s.resumable;
  },
  watchRun(runId) {
    const charts = {
      loss: new LineChart(document.getElementById("chart-loss")),
      lr: new LineChart(document.getElementById("chart-lr")),
      grad: new LineChart(document.getElementById("chart-grad")),
      speed: new LineChart(document.getElementById("chart-speed")),
      memory: new LineChart(document.getElementById("chart-memory")),
    };
    let steps = 0, final = false;
    // EventSource reconnects by itself after a lost connection and sends Last-Event-ID, so the server sends
    // only the points this page has not seen; a reload starts from the first point again.
    const source = new EventSource(`/api/runs/${runId}/events`);
    source.addEventListener("metric", e => {
      const r = JSON.parse(e.data);
      if (r.type === "train") {
        charts.loss.add("train loss", r.step, r.loss);
        charts.lr.add("learning rate", r.step, r.lr);
        charts.grad.add("gradient norm", r.step, r.grad_norm);
        charts.speed.add("trained tokens/s", r.step, r.tokens_per_s);
        if (r.rss_bytes) charts.memory.add("RSS", r.step, r.rss_bytes / 2 ** 30);
        if (r.gpu_peak_bytes) charts.memory.add("GPU peak", r.step, r.gpu_peak_bytes / 2 ** 30);
        steps = r.step;
        document.getElementById("step-count").textContent = steps;
      } else if (r.type === "validation") {
        charts.loss.add("validation loss", r.step, r.val_loss);
      }
    });
    source.addEventListener("reset", () => Object.values(charts).forEach(c => c.clear()));
    source.addEventListener("status", e => {
      const s = JSON.parse(e.data);
      studio.showState(s);
      if (["finished", "failed", "interrupted"].includes(s.state)) {
        final = true; source.close();
        setTimeout(() => studio.refreshLog(runId), 300);
        if (s.state === "finished" && !document.getElementById("health")) setTimeout(() => location.reload(), 800);
      }
    });
    const poll = setInterval(() => { if (final) clearInterval(poll); studio.refreshLog(runId); }, 3000);
  },
  async refreshLog(runId) {
    try {
      const response = await fetch(`/api/runs/${runId}/log`);
      if (response.ok) {
        const pre = document.getElementById("log");
        pre.textContent = await response.text();
        pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) { /* the next poll tries again */ }
  },
  async compare(ids, names) {
    const loss = new LineChart(document.getElementById("compare-loss"));
    const val = new LineChart(document.getElementById("compare-val"));
    for (let i = 0; i < ids.length; i++) {
      const data = await studio.api("GET", `/api/runs/${ids[i]}/metrics`);
      const label = `${names[i]} (#${ids[i]})`;
      for (const r of data.records) {
        if (r.type === "train") loss.add(label, r.step, r.loss);
        if (r.type === "validation") val.add(label, r.step, r.val_loss);
      }
    }
  },
};
window.studio = studio;
