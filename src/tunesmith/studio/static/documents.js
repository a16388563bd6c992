// tunesmith studio: the documents section of a project page and the document page (pages/documents.py).  Changes
// go through studio.api (static/studio.js, with the studio's token); every failure is shown as the sentence the
// server sent.  A generation job is followed by asking GET /api/jobs/{id} about once a second.
"use strict";
window.documentsPage = window.documentsPage || {
  dirty: false,  // a pair's editor holds text not saved yet (a finished job then does not reload the page)
  following: null,  // the job this page asks about
  upload(form, projectId) {  // an onsubmit handler: returns false at once (a promise would let the form submit)
    studio.notice("");
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    button.textContent = "Reading…";
    studio.api("POST", `/api/projects/${projectId}/documents`, new FormData(form), true)
      .then(data => { location.href = "/documents/" + data.id; })
      .catch(e => { studio.notice(e.message); button.disabled = false; button.textContent = "Upload"; });
    return false;
  },
  generate(form, documentId) {
    studio.notice("");
    const body = {model: form.model.value, pairs_per_chunk: Number(form.pairs_per_chunk.value),
                  max_retries: Number(form.max_retries.value), max_new_tokens: Number(form.max_new_tokens.value),
                  only_missing: form.only_missing.checked};
    studio.api("POST", `/api/documents/${documentId}/generate`, body)
      .then(job => { documentsPage.show(job); documentsPage.follow(job.id); })
      .catch(e => studio.notice(e.message));
    return false;
  },
  // the job's state on the page: N/M chunks, its message or result, the Cancel button while it can be cancelled
  show(job) {
    const box = document.getElementById("qa-job");
    const active = job.state === "queued" || job.state === "running";
    box.hidden = false;
    box.dataset.job = job.id;
    box.dataset.active = active ? "1" : "";
    document.getElementById("qa-job-id").textContent = job.id;
    const state = document.getElementById("qa-state");
    state.textContent = job.state;
    state.className = "state state-" + job.state;
    const bar = document.getElementById("qa-bar");
    bar.max = job.total || 1;
    bar.value = job.done;
    document.getElementById("qa-progress").textContent = `${job.done}/${job.total} chunks`;
    const result = job.result || {};
    let message;
    if (active) message = job.message || "waiting for its turn";
    else if (job.state === "failed") message = job.message || "failed";
    else message = `${result.pairs || 0} pairs, ${result.retries || 0} retries` +
      (job.state === "cancelled" ? " (cancelled; the pairs written before are kept)" : "");
    const text = document.getElementById("qa-message");
    text.textContent = message;
    text.className = job.state === "failed" ? "sentence" : "meta";
    document.getElementById("cancel-generation").hidden = !active;
    const failed = document.getElementById("qa-failed");
    failed.replaceChildren();
    for (const f of (active ? [] : result.failed_chunks || [])) {
      const item = document.createElement("li");
      const why = document.createElement("span");
      why.className = "sentence";
      why.textContent = f.error;
      item.append(`chunk ${f.chunk}: `, why);
      failed.append(item);
    }
  },
  follow(jobId) {
    if (documentsPage.following === jobId) return;
    documentsPage.following = jobId;
    const tick = async () => {
      if (documentsPage.following !== jobId) return;
      try {
        const job = await studio.api("GET", `/api/jobs/${jobId}`);
        documentsPage.show(job);
        if (!["queued", "running"].includes(job.state)) {
          documentsPage.following = null;
          // the new pairs are in the database: show them, unless that would lose an edit not saved yet
          if (!documentsPage.dirty) setTimeout(() => location.reload(), 600);
          else studio.notice("The generation has ended: save your edit, then reload the page to see the new pairs.", true);
          return;
        }
      } catch (e) { /* the next tick tries again */ }
      setTimeout(tick, 1000);
    };
    setTimeout(tick, 300);
  },
  watch() {  // on the document page's load: follow a job that is queued or running
    document.addEventListener("input", e => { if (e.target.closest(".pair")) documentsPage.dirty = true; });
    const box = document.getElementById("qa-job");
    if (box && box.dataset.active && box.dataset.job) documentsPage.follow(Number(box.dataset.job));
  },
  async cancel() {
    const box = document.getElementById("qa-job");
    const jobId = Number(box.dataset.job);
    if (!jobId) return;
    studio.notice("");
    const button = document.getElementById("cancel-generation");
    button.disabled = true;
    try {
      const job = await studio.api("POST", `/api/jobs/${jobId}/cancel`);
      documentsPage.show(job);
      document.getElementById("qa-message").textContent = "cancelling: the chunk being written is left out";
      documentsPage.follow(jobId);
    } catch (e) { studio.notice(e.message); }
    button.disabled = false;
  },
  pairElement(pairId) { return document.querySelector(`.pair[data-pair="${pairId}"]`); },
  async savePair(pairId) {
    studio.notice("");
    const el = documentsPage.pairElement(pairId);
    try {
      const pair = await studio.api("PUT", `/api/qa/${pairId}`, {
        question: el.querySelector('textarea[name="question"]').value,
        answer: el.querySelector('textarea[name="answer"]').value});
      el.querySelector('textarea[name="question"]').value = pair.question;
      el.querySelector('textarea[name="answer"]').value = pair.answer;
      if (pair.edited && !el.querySelector(".badge.edited")) {
        const badge = document.createElement("span");
        badge.className = "badge edited";
        badge.textContent = "edited";
        el.querySelector("div").append(badge);
        el.classList.add("edited");
      }
      documentsPage.dirty = false;
      studio.notice("Saved.", true);
    } catch (e) { studio.notice(e.message); }
  },
  async deletePair(pairId) {
    studio.notice("");
    try {
      await studio.api("DELETE", `/api/qa/${pairId}`);
      documentsPage.pairElement(pairId).remove();
      const count = document.getElementById("pair-count");
      count.textContent = Math.max(0, Number(count.textContent) - 1);
    } catch (e) { studio.notice(e.message); }
  },
  addPair(form, chunkId) {
    studio.notice("");
    studio.api("POST", `/api/chunks/${chunkId}/qa`, {question: form.question.value, answer: form.answer.value})
      .then(() => { documentsPage.dirty = false; location.reload(); })
      .catch(e => studio.notice(e.message));
    return false;
  },
  saveDataset(form, documentId) {
    studio.notice("");
    studio.api("POST", `/api/documents/${documentId}/dataset`, {name: form.name.value})
      .then(saved => {
        const link = document.getElementById("dataset-link");
        link.href = saved.url;
        link.textContent = `${saved.name} (${saved.rows} rows)`;
        document.getElementById("train-link").href = saved.train_url;
        document.getElementById("saved-dataset").hidden = false;
      })
      .catch(e => studio.notice(e.message));
    return false;
  },
  async deleteDocument(documentId, projectId) {
    if (!confirm("Delete this document, its chunks and its pairs? Datasets saved from it stay.")) return;
    try {
      await studio.api("DELETE", `/api/documents/${documentId}`);
      location.href = "/projects/" + projectId;
    } catch (e) { studio.notice(e.message); }
  },
};
