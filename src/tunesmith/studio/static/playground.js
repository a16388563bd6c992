// tunesmith studio: evaluation and export jobs on the run page, and the chat playground.  Changes go through
// studio.api (static/studio.js), which sends the studio's token; answers stream as server-sent events read
// with fetch (an EventSource cannot POST).
"use strict";
window.playground = window.playground || {
  // --- jobs: start one, then reload its list (rendered by the server) while any job in it runs
  watchJobs(containerId, url) {
    const box = document.getElementById(containerId);
    if (!box || box.dataset.watching) return;
    box.dataset.watching = "1";
    const tick = async () => {
      const current = document.getElementById(containerId);
      if (current && current.dataset.active) {
        try {
          const response = await fetch(url);
          if (response.ok) {
            const holder = document.createElement("div");
            holder.innerHTML = await response.text();
            const fresh = holder.firstElementChild;
            fresh.dataset.watching = "1";
            current.replaceWith(fresh);
          }
        } catch (e) { /* the next tick tries again */ }
      }
      setTimeout(tick, 1000);
    };
    setTimeout(tick, 1000);
  },
  activate(containerId) {
    const box = document.getElementById(containerId);
    if (box) box.dataset.active = "1";
  },
  number(value) {
    return value === "" || value === undefined ? null : Number(value);
  },
  startEval(form, runId) {
    studio.notice("");
    const body = {dataset_id: playground.number(form.dataset_id.value), limit: playground.number(form.limit.value),
                  max_new_tokens: playground.number(form.max_new_tokens.value)};
    studio.api("POST", `/api/runs/${runId}/eval`, body)
      .then(() => playground.activate("eval-jobs"))
      .catch(e => studio.notice(e.message));
    return false;
  },
  startExport(form, runId, what) {
    studio.notice("");
    const body = {what};
    if (form.quant) body.quant = form.quant.value;
    if (form.ollama) body.ollama = form.ollama.checked;
    studio.api("POST", `/api/runs/${runId}/export`, body)
      .then(() => playground.activate("export-jobs"))
      .catch(e => studio.notice(e.message));
    return false;
  },
  async cancelJob(jobId, containerId) {
    try {
      await studio.api("POST", `/api/jobs/${jobId}/cancel`);
      playground.activate(containerId);
    } catch (e) { studio.notice(e.message); }
  },
  async copy(text, button) {
    try {
      await navigator.clipboard.writeText(text.trim());
      if (button) { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); }
    } catch (e) { studio.notice("the browser did not allow copying; select the command and copy it by hand."); }
  },

  // --- the chat playground
  chatState: null,
  chat(runId, sessionId, tunedReady) {
    playground.chatState = {runId, sessionId, tunedReady, busy: false};
  },
  settings() {
    const form = document.getElementById("chat-settings");
    return {
      system_prompt: form.system_prompt.value || null,
      settings: {temperature: Number(form.temperature.value || 0), top_p: Number(form.top_p.value || 1),
                 max_new_tokens: Number(form.max_new_tokens.value || 256)},
    };
  },
  newChat() {
    const url = new URL(location.href);
    url.searchParams.set("session", "new");
    location.href = url.toString();
  },
  bubble(side, kind, text) {
    const box = document.querySelector(`#column-${side} .messages`);
    const div = document.createElement("div");
    div.className = "message " + kind;
    div.textContent = text;
    box.appendChild(div);
    box.scrollTop = box.scrollHeight;
    return div;
  },
  async send(form) {
    const state = playground.chatState;
    const content = form.content.value.trim();
    if (!content || state.busy) return false;
    studio.notice("");
    state.busy = true;
    form.querySelector("button").disabled = true;
    try {
      const settings = playground.settings();
      if (state.sessionId === null) {
        const made = await studio.api("POST", `/api/runs/${state.runId}/chat/sessions`, settings);
        state.sessionId = made.id;
        const url = new URL(location.href);
        url.searchParams.set("session", made.id);
        history.replaceState(null, "", url.toString());
      } else {
        await studio.api("PUT", `/api/chat/sessions/${state.sessionId}`, settings);
      }
      await studio.api("POST", `/api/chat/sessions/${state.sessionId}/messages`, {content});
      form.content.value = "";
      const sides = state.tunedReady ? ["base", "tuned"] : ["base"];
      for (const side of sides) playground.bubble(side, "user", content);
      await Promise.all(sides.map(side => playground.answer(state.sessionId, side)));
    } catch (e) {
      studio.notice(e.message);
    } finally {
      state.busy = false;
      form.querySelector("button").disabled = false;
    }
    return false;
  },
  async answer(sessionId, side) {
    const bubble = playground.bubble(side, "answer streaming", "");
    let response;
    try {
      response = await fetch(`/api/chat/sessions/${sessionId}/reply`, {
        method: "POST",
        headers: {"X-Tunesmith-Token": studio.token(), "Content-Type": "application/json"},
        body: JSON.stringify({side}),
      });
    } catch (e) {
      bubble.className = "message error"; bubble.textContent = "the studio did not answer (is it still running?)";
      return;
    }
    if (!response.ok) {
      let sentence = "the studio answered " + response.status;
      try { sentence = (await response.json()).error || sentence; } catch (e) { /* not JSON */ }
      bubble.className = "message error"; bubble.textContent = sentence;
      return;
    }
    // server-sent events: blocks separated by a blank line, each "event: NAME" and "data: JSON"
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        const payload = data ? JSON.parse(data) : {};
        if (kind === "piece") bubble.textContent += payload.text;
        else if (kind === "done") { bubble.textContent = payload.content; bubble.className = "message answer"; }
        else if (kind === "error") { bubble.className = "message error"; bubble.textContent = payload.error; }
        bubble.parentElement.scrollTop = bubble.parentElement.scrollHeight;
      }
    }
  },
};
