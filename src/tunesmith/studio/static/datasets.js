// tunesmith studio: the datasets section of a project page and the dataset page.  Every change goes through
// studio.api (with the studio's token); every failure is shown as the sentence the server sent.
"use strict";
const datasets = {
  PAGE_ROWS: 50,  // rows per page on the dataset page (pages/datasets.py PAGE_ROWS)
  // Open the dataset page at the page that holds row `number`, scrolled to it (reloaded even when only the
  // #fragment would change, so the problems and counts are fresh).
  goToRow(datasetId, number) {
    const offset = Math.floor((number - 1) / datasets.PAGE_ROWS) * datasets.PAGE_ROWS;
    const params = new URLSearchParams(location.search);
    const target = `/datasets/${datasetId}?offset=${offset}` + (params.get("search") ? "&search=" + encodeURIComponent(params.get("search")) : "");
    if (location.pathname + location.search === target) {
      location.hash = "row-" + number;
      location.reload();
    } else {
      location.href = target + "#row-" + number;
    }
  },
  dirty: false,  // an editor on the page holds text not saved yet
  // The token checks of a large dataset run in the background: ask until they are done, then show them (by
  // reloading the page, unless that would lose an edit not saved yet).
  waitForTokens(datasetId) {
    document.addEventListener("input", e => { if (e.target.matches("textarea")) datasets.dirty = true; });
    const poll = async () => {
      try {
        const data = await studio.api("GET", `/api/datasets/${datasetId}?wait=false`);
        if (!data.check.tokens_pending) {
          if (!datasets.dirty) { location.reload(); return; }
          studio.notice("The token counts are ready: save your edit, then reload the page to see them.", true);
          return;
        }
      } catch (e) { /* the next poll tries again */ }
      setTimeout(poll, 2000);
    };
    setTimeout(poll, 1000);
  },
  upload(form, projectId) {  // an onsubmit handler: returns false at once (a promise would let the form submit)
    studio.notice("");
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    studio.api("POST", `/api/projects/${projectId}/datasets`, new FormData(form), true)
      .then(data => { location.href = "/datasets/" + data.dataset.id; })
      .catch(e => { studio.notice(e.message); button.disabled = false; });
    return false;
  },
  // The editor's text goes as {"_raw": text}: the server reads it as one JSON object, or answers why it is not.
  async saveRow(datasetId, number) {
    studio.notice("");
    const text = document.querySelector(`#row-${number} textarea.row-json`).value;
    try {
      await studio.api("PUT", `/api/datasets/${datasetId}/rows/${number}`, {_raw: text});
      datasets.goToRow(datasetId, number);
    } catch (e) { studio.notice(e.message); }
  },
  async deleteRow(datasetId, number) {
    studio.notice("");
    try {
      const data = await studio.api("DELETE", `/api/datasets/${datasetId}/rows/${number}`);
      datasets.goToRow(datasetId, Math.max(1, Math.min(number, data.rows)));
    } catch (e) { studio.notice(e.message); }
  },
  addRow(form, datasetId) {
    studio.notice("");
    studio.api("POST", `/api/datasets/${datasetId}/rows`, {_raw: form.row.value})
      .then(data => datasets.goToRow(datasetId, data.number))
      .catch(e => studio.notice(e.message));
    return false;
  },
  async showTemplate(datasetId, number) {
    studio.notice("");
    const view = document.getElementById("template-view");
    try {
      const data = await studio.api("GET", `/api/datasets/${datasetId}/rows/${number}/template`);
      view.replaceChildren();
      const title = document.createElement("p");
      title.className = "meta";
      title.textContent = `Row ${number}` + (data.format ? ` (${data.format})` : "");
      const text = document.createElement("pre");
      text.className = "template";
      for (const seg of data.segments) {
        const span = document.createElement("span");
        span.className = (seg.masked ? "masked" : "trained") + (seg.cut ? " cut" : "");
        if (seg.cut) span.title = "past data.max_length: training never sees this";
        span.textContent = seg.text;
        text.appendChild(span);
      }
      view.append(title, text);
      view.dataset.row = String(number);
      view.scrollIntoView({block: "nearest"});
    } catch (e) { studio.notice(e.message); }
  },
  split(form, datasetId) {
    studio.notice("");
    studio.api("POST", `/api/datasets/${datasetId}/split`, {val_fraction: form.val_fraction.value, seed: form.seed.value})
      .then(data => {
        const out = document.getElementById("split-result");
        out.replaceChildren();
        for (const [label, d] of [["training", data.train], ["validation", data.validation]]) {
          const link = document.createElement("a");
          link.href = "/datasets/" + d.id;
          link.textContent = `${d.name} (${d.rows} rows)`;
          link.dataset.side = label;
          out.append(label[0].toUpperCase() + label.slice(1) + ": ", link, " ");
        }
        studio.notice(`Split into ${data.train.rows} training and ${data.validation.rows} validation rows.`, true);
      })
      .catch(e => studio.notice(e.message));
    return false;
  },
  askDelete() {
    document.getElementById("confirm-delete").hidden = false;
  },
  async deleteDataset(datasetId, projectId) {
    studio.notice("");
    try {
      await studio.api("DELETE", `/api/datasets/${datasetId}`);
      location.href = "/projects/" + projectId;
    } catch (e) { studio.notice(e.message); }
  },
};
window.datasets = datasets;
